//! The thread that talks to Redis.
//!
//! It takes work in this order: a round that failed (once its backoff is over),
//! acknowledgements from the shared sinks to record, a heartbeat that is due, a
//! window check that is due (alternating with rounds, so that neither starves),
//! then the next round off the queue: a round of ids (one pipeline per window,
//! up to [`ROUND_IDS`] ids, once the oldest waited [`rules::round_wait`] for
//! more to join them: a `MULTI` on one server, a `round.lua` per shard on a
//! cluster) or a closed window (all of this
//! instance's ids for it are in by then: it marks itself done and follows the
//! window until the fleet's record is complete). Every call that fails is retried
//! after a backoff; nothing taken off the queue is dropped, and the queue's lock is
//! never held while waiting on Redis.
//!
//! Shutdown: the forwarder sends what is queued, leaves the fleet (publishing what
//! is pending if it was the last instance), flushes the sinks and stops, or gives
//! up at the deadline, or as soon as a Redis call might outlast it. A window it
//! closed whose fleet record it cannot have then gets this instance's own count
//! (`scope=instance`, `revision=0`, `partial=true`), which any fleet revision
//! supersedes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use redis::{RedisError, RedisResult};

use super::delivery::Count;
use super::fleet::Fleet;
use super::keys::shard_of;
use super::lease::Renewal;
use super::rules::{self, Unacknowledged};
use super::settle::{Coverage, Force, Outcome, Settled, WindowView};
use super::{IdSet, Item, Queue, RedisSettings, Shared};
use crate::admission::Closed;
use crate::backoff::Backoff;
use crate::journal;
use crate::record::{CountRecord, SoFar, Timestamp};
use crate::redis_link::{RedisEndpoint, RedisLink};
use crate::report::Reporter;
use crate::sink::Acknowledged;
use crate::store::ClosedWindow;
use crate::window::{WindowLength, WindowStart};

/// Ids sent in one round trip, at most.
pub(super) const ROUND_IDS: usize = 256 * 1024;
/// The first retry after a failed call waits this long, each further one twice as
/// long, never longer than a heartbeat interval: this instance must not drop out of
/// the fleet for waiting on itself once Redis is back.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Windows remembered as finished, so that one left to the fleet by another run is
/// not taken over again after this run saw it done.
const FINISHED_REMEMBERED: usize = 64;
/// Surveys of a window per settle, at most: each one after the first follows a
/// loss Redis had, or a run that became done while the shards were read.
const SETTLE_SURVEYS: usize = 16;

pub(super) struct Forwarder {
    shared: Arc<Shared>,
    endpoint: RedisEndpoint,
    url: String,
    timeout: Duration,
    length: WindowLength,
    connection: Option<RedisLink>,
    /// Redis has answered since start-up.
    ever_connected: bool,
    /// Since when Redis has been failing, in ms since the epoch (published for
    /// `/healthz`, which turns unhealthy after a window of it).
    down_since_ms: Option<u64>,
    fleet: Fleet,
    reporter: Reporter,
    /// Records the shared sinks acknowledged, to note in Redis.
    acks: Option<flume::Receiver<Acknowledged>>,
    /// How long a record's publisher has to get it acknowledged by the shared
    /// sinks before another instance sends it, if the publisher no longer runs.
    redeliver_after: Duration,
    pending_acks: Vec<Acknowledged>,
    /// Per open window this run has sent ids to: what it delivered so far.
    delivered: BTreeMap<WindowStart, Delivery>,
    /// Windows this run saw finished lately: not to be taken over again.
    finished: VecDeque<WindowStart>,
    /// Closed windows this instance settled, followed until their record is
    /// complete (and acknowledged), or for a while after the fleet's wait.
    tracked: BTreeMap<WindowStart, Tracked>,
    /// A round that failed, to send again first.
    retry: Option<Round>,
    /// A check ran last: a round goes next, if there is one.
    round_next: bool,
    /// How long ids wait for more to join their round.
    round_wait: Duration,
    /// The count of the latest window whose record this run learned: what
    /// the next window is expected to hold, at least.
    latest_count: u64,
    latest_window: Option<WindowStart>,
    next_heartbeat: Instant,
    /// After a failure nothing is tried before this.
    resume_at: Option<Instant>,
    backoff: Backoff,
    /// Told once the first heartbeat has been tried (start-up waits for it), and
    /// whether the fleet refused this run.
    registered: Option<mpsc::Sender<Result<(), String>>>,
    /// Renewed by every heartbeat Redis answers while the fleet takes this run in.
    lease: Renewal,
    /// Start-up heard that the fleet refused this run: the thread ends.
    refused_at_start: bool,
    /// The window to close next (this run's first, then the one after the last
    /// closed), to notice windows the aggregator skipped.
    next_close: WindowStart,
    /// `VERVE_MAX_CLOCK_SKEW_MS`.
    max_clock_skew: Duration,
    /// The last heartbeat found this host's clock off Redis's by more than that.
    clock_skewed: bool,
    /// Where closed windows' journal files are, to delete once finished.
    journal_dir: Option<PathBuf>,
    /// Stopping: no Redis call starts that could end after this.
    finish_by: Option<Instant>,
    /// Stopping, and a call could have outlasted `finish_by`: give up now.
    out_of_time: bool,
}

/// What a run delivered to a window: ids per shard (a shard got its time to live
/// with the run's first ids for it), in rounds numbered from 1.
#[derive(Debug, Clone, Default)]
struct Delivery {
    ids: Vec<u64>,
    rounds: u64,
}

impl Delivery {
    /// Counts `ids` more delivered to each of `shards`, out of `count`.
    fn add(&mut self, shards: &[(usize, u64)], count: usize) {
        self.ids.resize(count, 0);
        for &(shard, ids) in shards {
            self.ids[shard] += ids;
        }
    }
}

enum Round {
    /// Ids, per window.
    Ids(Vec<Batch>),
    Close(ClosedWindow),
}

/// A round's ids for one window.
struct Batch {
    window: WindowStart,
    ids: Vec<i64>,
    /// Its round number, once given (kept if the round is sent again, so that
    /// it is counted once); 0 before.
    round: u64,
    /// When the first of the ids was queued.
    since: Instant,
}

enum Work {
    Round(Round),
    Ack(Acknowledged),
    Heartbeat,
    Check(WindowStart),
    Leave,
    GiveUp,
}

/// A window this instance settled, until the fleet is done with it.
struct Tracked {
    window: WindowStart,
    /// Its ids (to send again if Redis loses them) and endpoints; `None` for a
    /// window another instance left to the fleet.
    closed: Option<ClosedWindow>,
    view: WindowView,
    next_check: Instant,
    /// From then on, checks publish whatever the count is (`complete=false`).
    wait_over: Instant,
    /// Then this instance stops following the window.
    forget_at: Instant,
    /// The rounds this run sent to the window (a replay numbers on from them).
    rounds: u64,
    /// The revision this run sent to the shared sinks for a publisher that stopped
    /// before they acknowledged it.
    redelivered: u64,
}

impl Forwarder {
    pub(super) fn new(
        shared: Arc<Shared>,
        endpoint: RedisEndpoint,
        settings: RedisSettings,
        reporter: Reporter,
        registered: mpsc::Sender<Result<(), String>>,
        lease: Renewal,
    ) -> Self {
        let fleet = Fleet::new(&settings);
        let heartbeat_interval = fleet.heartbeat_interval();
        Forwarder {
            shared,
            endpoint,
            timeout: settings.timeout,
            length: settings.length,
            connection: None,
            ever_connected: false,
            down_since_ms: None,
            fleet,
            url: settings.url,
            reporter,
            acks: settings.acks,
            redeliver_after: settings.redeliver_after,
            pending_acks: Vec::new(),
            delivered: BTreeMap::new(),
            finished: VecDeque::new(),
            tracked: BTreeMap::new(),
            retry: None,
            round_next: false,
            round_wait: rules::round_wait(settings.length),
            latest_count: 0,
            latest_window: None,
            next_heartbeat: Instant::now(),
            resume_at: None,
            backoff: Backoff::new(FIRST_BACKOFF, heartbeat_interval),
            registered: Some(registered),
            lease,
            refused_at_start: false,
            next_close: settings.first_window,
            max_clock_skew: settings.max_clock_skew,
            clock_skewed: false,
            journal_dir: settings.journal_dir,
            finish_by: None,
            out_of_time: false,
        }
    }

    pub(super) fn run(mut self) {
        loop {
            match self.next_work() {
                Work::Round(Round::Ids(batches)) => self.send_ids(batches),
                Work::Round(Round::Close(closed)) => self.close(closed),
                Work::Ack(ack) => self.ack(ack),
                Work::Heartbeat => {
                    if !self.heartbeat() {
                        return;
                    }
                }
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
            self.finish_by = finishing;
            if self.out_of_time || finishing.is_some_and(|deadline| now >= deadline) {
                return Work::GiveUp;
            }
            if let Some(acks) = &self.acks {
                self.pending_acks.extend(acks.drain());
            }
            let wake = match self.resume_at.filter(|&at| at > now) {
                Some(at) => at,
                None => {
                    if let Some(round) = self.retry.take() {
                        return Work::Round(round);
                    }
                    if let Some(ack) = self.pending_acks.pop() {
                        return Work::Ack(ack);
                    }
                    // Heartbeats go on until the instance leaves: while it finishes,
                    // it still has ids to deliver that the fleet must wait for.
                    if self.next_heartbeat <= now {
                        return Work::Heartbeat;
                    }
                    let next_check = self
                        .tracked
                        .values()
                        .map(|t| (t.next_check, t.window))
                        .min();
                    let due = next_check.filter(|(at, _)| *at <= now && finishing.is_none());
                    if let Some((_, window)) = due.filter(|_| !self.round_next) {
                        self.round_next = true;
                        return Work::Check(window);
                    }
                    self.round_next = false;
                    let ripe = ripe_at(&queue, now, self.round_wait, finishing.is_some());
                    if ripe.is_some_and(|at| at <= now) {
                        if let Some(round) = take_round(&mut queue) {
                            return Work::Round(round);
                        }
                    }
                    if let Some((_, window)) = due {
                        return Work::Check(window);
                    }
                    if finishing.is_some() && queue.items.is_empty() {
                        return Work::Leave;
                    }
                    // At least once a heartbeat interval, to drain acknowledgements.
                    let wake = next_check
                        .map_or(self.next_heartbeat, |(at, _)| at.min(self.next_heartbeat));
                    ripe.map_or(wake, |at| at.min(wake))
                }
            };
            let wake = finishing.map_or(wake, |deadline| wake.min(deadline));
            queue = wait_until(&self.shared, queue, wake);
        }
    }

    /// Sends a round of ids: per window, the ids with their count as this
    /// run's deliveries, numbered so that a round sent again (its answer lost)
    /// or executed late is counted once (a count too high could hide a later
    /// loss). A window's first round proposes how many sets its shards are
    /// split into, from what this run expects of it.
    fn send_ids(&mut self, mut batches: Vec<Batch>) {
        if self.fleet.refusal.is_some() {
            // Split the fleet's way or not at all: the ids wait (and the buffer
            // fills, then 503) until the configuration is fixed.
            self.retry = Some(Round::Ids(batches));
            self.resume_at = Some(Instant::now() + self.fleet.heartbeat_interval());
            return;
        }
        while !batches.is_empty() {
            let mut batch = batches.remove(0);
            let window = batch.window;
            if batch.round == 0 {
                batch.round = self.delivered.get(&window).map_or(0, |d| d.rounds) + 1;
            }
            if !self.fleet.sets.knows(window) {
                self.propose_sets(&batch);
            }
            let (ids, round) = (&batch.ids, batch.round);
            let Some(shards) =
                self.call(|link, fleet| fleet.deliver(link, window, ids, round, Count::Add))
            else {
                batches.insert(0, batch);
                self.retry = Some(Round::Ids(batches));
                return;
            };
            let delivery = self.delivered.entry(window).or_default();
            delivery.add(&shards, self.fleet.shards);
            delivery.rounds = round;
            self.taken(batch.ids.len());
        }
    }

    /// Proposes how many sets each shard of a window is split into, from the
    /// ids this run expects in it: the latest count the fleet published, or
    /// this round's ids over the time they gathered, over the whole window and
    /// every live run.
    fn propose_sets(&mut self, batch: &Batch) {
        let window = Duration::from_secs(self.length.as_secs());
        let expected = rules::expected_ids(
            self.latest_count,
            batch.ids.len(),
            batch.since.elapsed(),
            window,
            self.fleet.live_runs,
        );
        let fleet = &mut self.fleet;
        let sets = rules::sets_per_shard(expected, fleet.shards, fleet.intset_limit);
        let sentinels = fleet.sentinels();
        fleet.sets.propose(batch.window, sets, sentinels);
    }

    /// Accounts for ids Redis took, and reopens admission once the buffer drained.
    fn taken(&self, ids: usize) {
        let mut queue = self.shared.queue();
        queue.buffered_ids -= ids;
        let gauges = &self.shared.gauges;
        gauges
            .buffered_ids
            .store(queue.buffered_ids as u64, Ordering::Relaxed);
        gauges.rounds.fetch_add(1, Ordering::Relaxed);
        let admission = &self.shared.admission;
        if admission.is_closed_for(Closed::BufferFull)
            && queue.buffered_ids * 10 < self.shared.capacity * 9
        {
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
        if let Some(first) = rules::first_window_after_skip(self.next_close, window) {
            self.fleet.starts_at(first);
            self.next_heartbeat = Instant::now();
        }
        self.next_close = self.next_close.max(self.length.next(window));
        let coverage = match closed.partial {
            true => Coverage::Partial,
            false => Coverage::Full,
        };
        let mut tracked = self.track(window, Some(closed), Some(coverage));
        let force = self.force(&tracked);
        match self.settle(&mut tracked, force) {
            Some(settled) => {
                self.delivered.remove(&window);
                self.learn(&mut tracked, &settled);
                self.follow(tracked);
            }
            None => {
                if let Some(closed) = tracked.closed {
                    self.retry = Some(Round::Close(closed));
                }
            }
        }
    }

    /// A window to follow, as this instance knows it so far.
    fn track(
        &self,
        window: WindowStart,
        closed: Option<ClosedWindow>,
        coverage: Option<Coverage>,
    ) -> Tracked {
        let end = self.length.end_of(window);
        let wait_over = instant_of(end + self.fleet.wait);
        let window_length = Duration::from_secs(self.length.as_secs());
        let delivery = self.delivered.get(&window).cloned().unwrap_or_default();
        Tracked {
            window,
            view: WindowView {
                coverage,
                delivered: delivery.ids,
                known: None,
                acked: 0,
                members: BTreeSet::new(),
                generation: None,
            },
            closed,
            rounds: delivery.rounds,
            next_check: Instant::now() + self.fleet.poll_interval(window),
            wait_over,
            forget_at: wait_over + self.fleet.wait.max(window_length) + self.redeliver_after,
            redelivered: 0,
        }
    }

    /// Keeps following a window, unless the fleet is done with it.
    fn follow(&mut self, tracked: Tracked) {
        if self.is_finished(&tracked) {
            self.forget_journal(tracked.window);
            self.finished.push_back(tracked.window);
            if self.finished.len() > FINISHED_REMEMBERED {
                self.finished.pop_front();
            }
        } else {
            self.tracked.insert(tracked.window, tracked);
        }
    }

    /// How hard a settle of `tracked` may push: once the fleet's wait is over it
    /// publishes whatever is there, unless [`Self::force_now`] takes that back
    /// at the settle itself (shortly after a loss of Redis's data).
    fn force(&self, tracked: &Tracked) -> Force {
        match Instant::now() >= tracked.wait_over {
            true => Force::Yes,
            false => Force::No,
        }
    }

    /// `force` as it stands at a settle: for a heartbeat lifetime after a loss of
    /// Redis's data, a run that knows no record of the window does not publish
    /// it by force (runs that knew the record put it back first). Decided at
    /// each `settle.lua`, not once per check: the survey or the replay just
    /// before may be where this run noticed the loss.
    fn force_now(&mut self, force: Force, view: &WindowView) -> Force {
        match force {
            Force::Yes if view.known.is_none() && self.fleet.is_uncertain() => Force::No,
            force => force,
        }
    }

    /// Checks a window the fleet has not finished: publishes it once the fleet's
    /// wait is over, learns revisions, and forgets it when finished or old.
    fn check(&mut self, window: WindowStart) {
        let Some(mut tracked) = self.tracked.remove(&window) else {
            return;
        };
        let now = Instant::now();
        let force = self.force(&tracked);
        if let Some(settled) = self.settle(&mut tracked, force) {
            self.learn(&mut tracked, &settled);
            if self.is_finished(&tracked) {
                return self.follow(tracked);
            }
            if now >= tracked.forget_at {
                tracing::warn!(
                    window_start = %window,
                    unique_requests = settled.count,
                    instances_done = settled.done,
                    revision = tracked.view.known.as_ref().map_or(0, |k| k.fleet.revision),
                    "stopped following a window the fleet has not completed"
                );
                self.forget_journal(window);
                return;
            }
            tracked.next_check = now + self.fleet.poll_interval(window);
        }
        self.tracked.insert(window, tracked);
    }

    /// Deletes a window's journal file: the fleet has its ids and its record.
    fn forget_journal(&self, window: WindowStart) {
        if let Some(dir) = &self.journal_dir {
            journal::remove_window_file(dir, window);
        }
    }

    /// Whether the fleet is done with a window: its record is complete and, if
    /// this instance writes to shared sinks, they acknowledged it.
    fn is_finished(&self, tracked: &Tracked) -> bool {
        tracked.view.known.as_ref().is_some_and(|known| {
            let acked = tracked.view.acked >= known.fleet.revision;
            known.fleet.complete && (acked || !self.reporter.has_shared_sinks())
        })
    }

    /// Settles a window: surveys it, beats first if Redis lost its data since the
    /// last heartbeat, sends the shards Redis lost ids of again, and runs
    /// `settle.lua` with the count, surveying again while runs become done in
    /// between. Returns `None` if Redis failed; `Outcome::Again` if runs kept
    /// becoming done (the next check goes on).
    fn settle(&mut self, tracked: &mut Tracked, force: Force) -> Option<Settled> {
        let window = tracked.window;
        let mut settled = None;
        for _ in 0..SETTLE_SURVEYS {
            let survey = self.call(|link, fleet| fleet.survey(link, window))?;
            if !self.fleet.knows_epoch(&survey.epoch) {
                self.beat()?;
                continue;
            }
            let short = self.fleet.short_shards(&survey, &tracked.view.delivered);
            if !short.is_empty() {
                let closed = tracked.closed.as_ref()?;
                tracked.rounds = self.replay(window, &closed.ids, &short, tracked.rounds)?;
                continue;
            }
            let force = self.force_now(force, &tracked.view);
            let view = &tracked.view;
            let answer =
                self.call(|link, fleet| fleet.settle(link, window, view, &survey, force))?;
            tracked.view.generation = Some(answer.generation);
            if answer.outcome != Outcome::Again {
                return Some(answer);
            }
            settled = Some(answer);
        }
        settled
    }

    /// Reports a record newer than any seen for the window (to the shared sinks
    /// too if this process published it), and sends a record on to the shared
    /// sinks if its publisher stopped before they acknowledged it.
    fn learn(&mut self, tracked: &mut Tracked, settled: &Settled) {
        let view = &mut tracked.view;
        view.acked = view.acked.max(settled.acked);
        view.members.extend(settled.members.iter().cloned());
        let Some(record) = &settled.record else {
            return;
        };
        let window = tracked.window;
        let count = record.to_record(window, self.length);
        let endpoints = tracked.closed.as_ref().map_or(&[][..], |c| &c.endpoints);
        let newer = view
            .known
            .as_ref()
            .map_or(true, |known| known.fleet.revision < record.fleet.revision);
        if newer {
            // A publication whose answer was lost (a timeout) shows up as this
            // process's record on the next call.
            let published = settled.outcome == Outcome::Published || record.by == self.fleet.run;
            view.known = Some(record.clone());
            self.reporter.report(&count, published, endpoints);
            if published {
                self.fleet
                    .warn_if_not_compact(window, record.fleet.unique_requests);
            }
        }
        if self.latest_window.map_or(true, |latest| latest <= window) {
            self.latest_window = Some(window);
            self.latest_count = record.fleet.unique_requests;
        }
        // The publisher had its time: since it left, or (live, or dead) since it
        // published.
        let since = match settled.publisher_left_ms {
            0 => record.fleet.published_at_ms,
            left => left,
        };
        let waited = Duration::from_millis(Timestamp::now().unix_millis().saturating_sub(since));
        let unacknowledged = Unacknowledged {
            revision: record.fleet.revision,
            acked: settled.acked,
            mine: record.by == self.fleet.run,
            resent: tracked.redelivered,
            waited,
        };
        if unacknowledged.resends(self.redeliver_after) && self.reporter.has_shared_sinks() {
            tracked.redelivered = record.fleet.revision;
            tracing::warn!(
                window_start = %window,
                revision = record.fleet.revision,
                publisher_live = settled.publisher_live,
                "the shared sinks have not acknowledged this record in time (its publisher stopped, or cannot reach them); sending it on"
            );
            self.reporter.redeliver(&count);
        }
    }

    /// Redis lost ids this run delivered to `short` shards of `window`: marks the
    /// run `sending` again (no run may take the window as complete meanwhile),
    /// then sends every id of those shards again, in rounds numbered on from
    /// `rounds`, the first to each sentinel starting its count again, so that a
    /// replay cut short is found short again. Returns the last round's number, or
    /// `None` if Redis failed.
    fn replay(
        &mut self,
        window: WindowStart,
        ids: &[IdSet],
        short: &[usize],
        rounds: u64,
    ) -> Option<u64> {
        self.fleet.lost_data();
        let (fleet, shards) = (&self.fleet, self.fleet.shards);
        let mut lost = vec![Vec::new(); fleet.sentinels()];
        for part in ids {
            part.for_each(|id| {
                let shard = shard_of(id, shards);
                if short.contains(&shard) {
                    lost[fleet.sentinel_of(shard)].push(id);
                }
            });
        }
        self.shared.gauges.replays.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            window_start = %window,
            ids = lost.iter().map(Vec::len).sum::<usize>(),
            shards = short.len(),
            "Redis lost ids this instance had delivered to a window (a restart, FLUSHALL, a failover, eviction); sending them again"
        );
        let sending = self.fleet.sending(window).to_vec();
        self.call(|link, fleet| fleet.pipeline(link, sending, false))?;
        let mut round = rounds;
        for ids in lost.iter().filter(|ids| !ids.is_empty()) {
            // Redis may have lost the shards' keys: every round gives them their
            // time to live again.
            for (i, chunk) in ids.chunks(ROUND_IDS).enumerate() {
                // A long replay must not let this run's heartbeat lapse.
                if self.next_heartbeat <= Instant::now() {
                    self.beat()?;
                }
                round += 1;
                let count = match i {
                    0 => Count::Set,
                    _ => Count::Add,
                };
                self.call(|link, fleet| fleet.deliver(link, window, chunk, round, count))?;
            }
        }
        Some(round)
    }

    /// The scheduled heartbeat: tells the fleet this run is alive, and settles the
    /// windows stopped runs left unfinished, once their wait is over.
    /// Returns false if the fleet refused this run at start-up: the thread ends,
    /// and so does start-up, with the reason.
    fn heartbeat(&mut self) -> bool {
        let Some(orphans) = self.beat() else {
            return !self.refused_at_start;
        };
        for window in orphans {
            let ours = self.tracked.contains_key(&window)
                || self.delivered.contains_key(&window)
                || self.finished.contains(&window);
            if rules::adopts(ours, self.fleet.is_wait_over(window)) {
                self.adopt(window);
            }
        }
        true
    }

    /// Tells the fleet this run is alive; returns the windows left to the fleet,
    /// or `None` if Redis failed.
    fn beat(&mut self) -> Option<Vec<WindowStart>> {
        let sent = Instant::now();
        let orphans = self.call(|link, fleet| fleet.heartbeat(link));
        if let Some(offset) = self.fleet.clock_offset_ms {
            self.clock_offset(offset);
        }
        if let Some(began) = self.fleet.epoch_began_ms() {
            let gauge = &self.shared.gauges.epoch_began_ms;
            gauge.store(began, Ordering::Relaxed);
        }
        // `ok` only once the fleet took this run in, and never while it refuses it
        // (before start-up hears of it: the first request may follow at once).
        let in_fleet = match (&orphans, &self.fleet.refusal) {
            (_, Some(_)) => Some(false),
            (Some(_), None) => Some(true),
            (None, None) => None,
        };
        if let Some(in_fleet) = in_fleet {
            self.shared.admission.set(Closed::NotInFleet, !in_fleet);
            let gauge = &self.shared.gauges.in_fleet;
            gauge.store(u64::from(in_fleet), Ordering::Relaxed);
        }
        if let Some(registered) = self.registered.take() {
            let outcome = match &self.fleet.refusal {
                Some(refusal) => Err(refusal.clone()),
                None => Ok(()),
            };
            // Start-up fails only if it is still waiting to hear it; otherwise the
            // instance runs on, refused, and delivers nothing.
            self.refused_at_start = outcome.is_err() && registered.send(outcome).is_ok();
        }
        if orphans.is_some() {
            self.next_heartbeat = Instant::now() + self.fleet.heartbeat_interval();
            self.lease.renew(sent);
        }
        orphans
    }

    /// Publishes how far Redis's clock is from this host's, and says so when it
    /// goes past `VERVE_MAX_CLOCK_SKEW_MS` (and when it is back within).
    fn clock_offset(&mut self, offset_ms: i64) {
        self.shared
            .gauges
            .clock_offset_ms
            .store(offset_ms, Ordering::Relaxed);
        let skewed = offset_ms.unsigned_abs() > self.max_clock_skew.as_millis() as u64;
        if skewed && !self.clock_skewed {
            tracing::warn!(
                offset_ms,
                "this host's clock is off Redis's by more than VERVE_MAX_CLOCK_SKEW_MS: windows are \
                 cut by this host's clock, so its ids may count in other windows than the fleet's; \
                 check NTP"
            );
        } else if !skewed && self.clock_skewed {
            tracing::info!(offset_ms, "this host's clock is back in step with Redis's");
        }
        self.clock_skewed = skewed;
    }

    /// Settles a window a stopped run left unfinished, taking no part in it:
    /// publishes what is there, if nobody has since.
    fn adopt(&mut self, window: WindowStart) {
        let mut tracked = self.track(window, None, None);
        let Some(settled) = self.settle(&mut tracked, Force::Yes) else {
            return;
        };
        if let (Outcome::Published, Some(record)) = (settled.outcome, &settled.record) {
            tracing::info!(window_start = %window, "settled a window left unfinished by a stopped instance");
            let count = record.to_record(window, self.length);
            self.reporter.report(&count, true, &[]);
        }
    }

    /// Notes in Redis that the shared sinks acknowledged a record.
    fn ack(&mut self, ack: Acknowledged) {
        if self
            .call(|link, fleet| fleet.ack(link, ack.window, ack.revision))
            .is_none()
        {
            self.pending_acks.push(ack);
        }
    }

    /// Shutdown, once everything queued is sent: leaves the fleet, publishes the
    /// windows still pending if no other instance may, leaves the others to the
    /// fleet, and flushes the sinks.
    fn leave(mut self) {
        let deadline = self.shared.queue().finish_by.unwrap_or_else(Instant::now);
        let windows: Vec<WindowStart> = self.tracked.keys().copied().collect();
        let left = self
            .call(|link, fleet| fleet.leave(link, &windows))
            .is_some();
        for window in windows {
            let Some(mut tracked) = self.tracked.remove(&window) else {
                continue;
            };
            let settled = match left && Instant::now() < deadline {
                true => self.settle(&mut tracked, Force::IfAlone),
                false => None,
            };
            if let Some(settled) = &settled {
                self.learn(&mut tracked, settled);
            }
            let Some(closed) = tracked
                .closed
                .as_ref()
                .filter(|_| tracked.view.known.is_none())
            else {
                continue;
            };
            let Some(settled) = settled else {
                // No word from the fleet in time: this instance's own count.
                self.publish_own(closed.window, closed.unique_requests, &closed.endpoints);
                continue;
            };
            tracing::info!(window_start = %window, "leaving the window to the rest of the fleet");
            // Its clients' endpoints hear the count so far rather than nothing.
            let whose = SoFar::Fleet {
                instances: settled.done,
            };
            let so_far = CountRecord::so_far(window, self.length, settled.count, whose);
            self.reporter.call_back(&so_far, &closed.endpoints);
        }
        self.reporter.flush(deadline);
        // What the shared sinks acknowledged by now, so that no other instance
        // sends it again.
        if let Some(acks) = &self.acks {
            self.pending_acks.extend(acks.drain());
        }
        while Instant::now() < deadline {
            let Some(ack) = self.pending_acks.pop() else {
                break;
            };
            let (window, revision) = (ack.window, ack.revision);
            if self
                .call(|link, fleet| fleet.ack(link, window, revision))
                .is_none()
            {
                break;
            }
        }
    }

    /// Shutdown, at the deadline, with Redis still failing or behind: publishes
    /// this instance's own count of every window it closed that has no fleet
    /// record, and says how many ids Redis did not take, per window, and whether
    /// the journal keeps them.
    fn give_up(mut self) {
        let mut queue = self.shared.queue();
        let items = std::mem::take(&mut queue.items);
        queue.closes = 0;
        drop(queue);
        let mut unsent: BTreeMap<WindowStart, usize> = BTreeMap::new();
        let mut unreported = Vec::new();
        let retried = match self.retry.take() {
            Some(Round::Ids(batches)) => batches
                .into_iter()
                .map(|b| Item::Ids {
                    window: b.window,
                    ids: b.ids,
                    since: b.since,
                })
                .collect(),
            Some(Round::Close(closed)) => vec![Item::Close(closed)],
            None => Vec::new(),
        };
        for item in retried.into_iter().chain(items) {
            match item {
                Item::Ids { window, ids, .. } => *unsent.entry(window).or_default() += ids.len(),
                Item::Close(closed) => unreported.push(closed),
            }
        }
        let tracked = std::mem::take(&mut self.tracked);
        let unknown = tracked.into_values().filter(|t| t.view.known.is_none());
        unreported.extend(unknown.filter_map(|t| t.closed));
        for closed in &unreported {
            self.publish_own(closed.window, closed.unique_requests, &closed.endpoints);
        }
        let unsent_ids: usize = unsent.values().sum();
        let windows = unsent
            .iter()
            .map(|(window, ids)| format!("{window}:{ids}"))
            .collect::<Vec<_>>()
            .join(",");
        match (&self.journal_dir, unsent_ids) {
            (_, 0) if unreported.is_empty() => {}
            (_, 0) => tracing::warn!(
                own_records = unreported.len(),
                "Redis could not finish the fleet's records by the shutdown deadline; \
                 published this instance's own counts"
            ),
            (Some(dir), _) => tracing::warn!(
                unsent_ids,
                windows,
                data_dir = %dir.display(),
                "Redis did not take every id by the shutdown deadline: they are kept in the \
                 journal, and the next start with this VERVE_INSTANCE and VERVE_DATA_DIR \
                 delivers them"
            ),
            (None, _) => tracing::error!(
                lost_ids = unsent_ids,
                windows,
                "Redis did not take every id by the shutdown deadline, and with \
                 VERVE_JOURNAL=false they are lost"
            ),
        }
        self.reporter.flush(Instant::now());
    }

    /// Publishes this instance's own count of a window whose fleet record it
    /// cannot have before it stops: not a fleet revision (0, `scope=instance`),
    /// so that any record of the fleet's supersedes it.
    fn publish_own(&mut self, window: WindowStart, unique_requests: u64, endpoints: &[Arc<str>]) {
        let whose = SoFar::Instance { partial: true };
        let own = CountRecord::so_far(window, self.length, unique_requests, whose);
        self.reporter.report(&own, true, endpoints);
    }

    /// Runs `op` on the link (connecting first if needed). On failure, drops the
    /// link, says so once per outage, and backs off.
    fn call<T>(
        &mut self,
        op: impl FnOnce(&mut RedisLink, &mut Fleet) -> RedisResult<T>,
    ) -> Option<T> {
        // A call may take a timeout for each step: connecting, its handshake,
        // then the command itself.
        let longest = 3 * self.timeout;
        if self
            .finish_by
            .is_some_and(|deadline| Instant::now() + longest > deadline)
        {
            // Stopping: a call now could outlast the deadline, and then nothing
            // would be published or said. Give up instead.
            self.out_of_time = true;
            return None;
        }
        let result = self.connect().and_then(|()| {
            let link = self.connection.as_mut().expect("connected above");
            op(link, &mut self.fleet)
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
        let mut link = self.endpoint.connect(self.timeout)?;
        if !self.ever_connected {
            self.ever_connected = true;
            self.fleet.check_settings(&mut link);
        }
        self.connection = Some(link);
        Ok(())
    }

    fn recovered(&mut self) {
        self.backoff = Backoff::new(FIRST_BACKOFF, self.fleet.heartbeat_interval());
        self.resume_at = None;
        if let Some(since) = self.down_since_ms.take() {
            self.shared.gauges.down_since_ms.store(0, Ordering::Relaxed);
            let down_ms = Timestamp::now().unix_millis().saturating_sub(since);
            tracing::info!(down_ms, "Redis reachable again");
        }
    }

    fn failed(&mut self, error: &RedisError) {
        self.connection = None;
        self.resume_at = Some(Instant::now() + self.backoff.next_wait());
        let gauges = &self.shared.gauges;
        gauges.errors.fetch_add(1, Ordering::Relaxed);
        if self.down_since_ms.is_some() {
            tracing::debug!(%error, "Redis still failing");
            return;
        }
        let since = Timestamp::now().unix_millis();
        self.down_since_ms = Some(since);
        gauges.down_since_ms.store(since, Ordering::Relaxed);
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

/// When the next round off the queue may go (`now` or earlier: at once): for a
/// closed window, or
/// when stopping, or when a round's worth of ids (or a closed window behind
/// them) is queued; else once the oldest ids waited `wait` for more to join
/// them. `None` when the queue is empty.
fn ripe_at(queue: &Queue, now: Instant, wait: Duration, finishing: bool) -> Option<Instant> {
    match queue.items.front()? {
        Item::Close(_) => Some(now),
        Item::Ids { since, .. } => {
            let full = queue.buffered_ids >= ROUND_IDS || queue.closes > 0;
            Some(match full || finishing {
                true => *since,
                false => *since + wait,
            })
        }
    }
}

/// The next round off the queue: one closed window, or ids up to [`ROUND_IDS`],
/// gathered by window (two windows interleave around a boundary).
fn take_round(queue: &mut Queue) -> Option<Round> {
    let (window, ids, since) = match queue.items.pop_front()? {
        Item::Close(closed) => {
            queue.closes -= 1;
            return Some(Round::Close(closed));
        }
        Item::Ids { window, ids, since } => (window, ids, since),
    };
    let mut count = ids.len();
    let mut batches = vec![Batch {
        window,
        ids,
        round: 0,
        since,
    }];
    while count < ROUND_IDS && matches!(queue.items.front(), Some(Item::Ids { .. })) {
        if let Some(Item::Ids { window, ids, since }) = queue.items.pop_front() {
            count += ids.len();
            match batches.iter_mut().find(|b| b.window == window) {
                Some(batch) => batch.ids.extend_from_slice(&ids),
                None => batches.push(Batch {
                    window,
                    ids,
                    round: 0,
                    since,
                }),
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

#[cfg(test)]
mod tests {
    use super::*;

    const W: WindowStart = WindowStart::from_unix_secs(600);

    fn queued(ids: usize, since: Instant) -> Item {
        Item::Ids {
            window: W,
            ids: vec![7; ids],
            since,
        }
    }

    #[test]
    fn ids_wait_for_their_round_unless_a_round_or_a_close_is_queued() {
        let wait = Duration::from_millis(400);
        let since = Instant::now();
        let now = since + Duration::from_millis(100);
        let mut queue = Queue::default();
        assert_eq!(ripe_at(&queue, now, wait, false), None);
        queue.items.push_back(queued(10, since));
        queue.buffered_ids = 10;
        assert_eq!(ripe_at(&queue, now, wait, false), Some(since + wait));
        // Stopping: at once.
        assert_eq!(ripe_at(&queue, now, wait, true), Some(since));
        // A round's worth queued: at once.
        queue.buffered_ids = ROUND_IDS;
        assert_eq!(ripe_at(&queue, now, wait, false), Some(since));
        queue.buffered_ids = 10;
        // A closed window behind the ids: they go at once, and so does it.
        let closed = ClosedWindow {
            window: W,
            unique_requests: 0,
            ids: Vec::new(),
            endpoints: Vec::new(),
            partial: false,
            published_before: 0,
        };
        queue.items.push_back(Item::Close(closed));
        queue.closes = 1;
        assert_eq!(ripe_at(&queue, now, wait, false), Some(since));
        assert!(matches!(take_round(&mut queue), Some(Round::Ids(_))));
        assert_eq!(ripe_at(&queue, now, wait, false), Some(now));
        assert!(matches!(take_round(&mut queue), Some(Round::Close(_))));
        assert_eq!(queue.closes, 0);
    }
}
