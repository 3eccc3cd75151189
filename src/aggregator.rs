//! The aggregator: one thread that owns every open window's set of ids.
//!
//! Workers send it [`Handoff`]s: batches of ids, which it inserts into the
//! [`IdSet`] of the batch's window (itself, or through the owner threads of its
//! `Partitions`), telling the [`DedupStore`] which ids were new to this instance
//! when the store asks; and watermarks, each worker's promise that it has handed
//! over every id of the windows before its watermark. A window closes once every
//! worker's watermark is past it, not after a fixed delay that a held-up worker
//! could outlast: then its set (every part of it) is taken out whole and handed to
//! the store, which settles and reports the count. There is no moment at which ids can
//! slip in between counting and clearing, and no id answered `ok` arrives after its
//! window closed. Windows close strictly in order, so a window that received
//! nothing is reported with 0.
//!
//! Counts are kept as ids go in: an [`IdSet`]'s length is the number of inserts
//! that found their id new, and a window's count is the sum over its parts.
//!
//! With a `Journal`, the ids new to this instance go to it as well (queued per
//! batch, written whenever the workers' channel runs empty), and the windows it
//! held at start are put back: those still open into their sets, the ones that
//! ended while the process was down published at once. A window's file goes once
//! its record is out for good; a stop within it leaves the file, noting the
//! record, so that the next start goes on counting into the same set and
//! publishes the next revision.
//!
//! The aggregator also remembers, per window, the distinct endpoints requests named
//! (at most `VERVE_CALLBACK_MAX_ENDPOINTS`; mentions beyond are counted and logged):
//! they go with the closed window to be called back with its count, or, in
//! immediate timing, are called as batches arrive, with the count so far.
//!
//! Invariants: every window from the one the service started in to the one it
//! stops in is closed exactly once, except a run of windows without ids closing at
//! once that spans more than an hour and ten windows (the clock jumped forward),
//! which is skipped with one line; the first is partial unless the service
//! started on its boundary, the last is partial if the service stopped within it.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flume::{Receiver, RecvTimeoutError};

use crate::batch::{Batch, Handoff, Watermark};
use crate::callback::{CallbackJob, Callbacks};
use crate::journal::{Journal, RecoveredWindow};
use crate::partition::{BatchTimes, Partitions};
use crate::record::{CountRecord, SoFar, Timestamp};
use crate::store::ClosedWindow;
use crate::store::{DedupStore, IdSet};
use crate::window::{WindowLength, WindowStart};

/// The longest the aggregator waits without a heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// A window still open this long after its end is held up by a worker: say so.
const HELD_UP_AFTER: Duration = Duration::from_secs(5);

/// A run of windows without an id closing at once that spans more than this (and
/// more than [`MAX_EMPTY_WINDOWS_AT_ONCE`] windows) means the clock jumped forward,
/// or the process was frozen that long: the run is skipped with one line instead
/// of one record each (a jump of days would otherwise report hundreds of thousands
/// of zeros). Shorter stalls, a held-up worker among them, are reported window by
/// window, so that in Redis mode this instance marks each of them done.
const SKIPPED_AFTER: Duration = Duration::from_secs(3600);

/// However long the windows, a run of this many or fewer is reported one by one.
const MAX_EMPTY_WINDOWS_AT_ONCE: u64 = 10;

/// What the aggregator holds for a window until it closes, beside its ids (which
/// the partitions hold).
#[derive(Default)]
struct OpenWindow {
    endpoints: HashSet<Arc<str>>,
    /// Endpoint mentions refused because `endpoints` was full.
    endpoints_over_cap: u64,
    /// The revision of the last record already out for the window (0: none),
    /// from the journal: a stop within it published one.
    published_before: u64,
}

/// What the aggregator publishes for `/metrics` and `/healthz`; only it writes.
#[derive(Debug, Default)]
pub struct AggregatorGauges {
    pub windows_closed: AtomicU64,
    /// Windows without ids skipped at once because the clock jumped forward.
    pub windows_skipped: AtomicU64,
    pub late_ids: AtomicU64,
    /// When the oldest open window ended (or will end), in ms since the epoch.
    pub next_close_due_ms: AtomicU64,
    /// Batches waiting for the aggregator, as last seen by it.
    pub channel_depth: AtomicU64,
    /// The most batches ever seen waiting.
    pub channel_depth_peak: AtomicU64,
    /// How long inserting each batch took (in the aggregator or an owner).
    pub batch_times: Arc<BatchTimes>,
    /// When the aggregator last went round its loop, in ms since the epoch.
    pub heartbeat_ms: AtomicU64,
}

impl AggregatorGauges {
    /// The gauges of an aggregator starting now: its heartbeat is fresh, so that
    /// `/healthz` does not call it stalled before its first round.
    pub fn starting_now() -> Self {
        let gauges = AggregatorGauges::default();
        gauges
            .heartbeat_ms
            .store(Timestamp::now().unix_millis(), Ordering::Relaxed);
        gauges
    }
}

pub struct Aggregator {
    length: WindowLength,
    open: BTreeMap<WindowStart, OpenWindow>,
    /// The oldest window not yet closed; all earlier ones are.
    next_close: WindowStart,
    /// Per worker: every id it stamped with an earlier window has arrived.
    watermarks: Vec<WindowStart>,
    /// The window the service started in, when it started after that window began.
    started_within: Option<WindowStart>,
    store: Box<dyn DedupStore>,
    /// Where the open windows' ids are inserted.
    partitions: Partitions,
    /// The size of the last complete window: new sets start at this capacity, since
    /// traffic changes little from one window to the next and growing a set of
    /// millions of ids step by step costs far more than reserving it once.
    capacity_hint: usize,
    /// Distinct endpoints remembered per window; 0 ignores endpoints.
    max_endpoints: usize,
    /// Immediate timing: callbacks with the count so far, as batches arrive.
    immediate: Option<Callbacks>,
    /// The held-up window last warned about, so that each is warned about once.
    warned_held_up: Option<WindowStart>,
    gauges: Arc<AggregatorGauges>,
    /// Where new ids are kept on disk, unless turned off.
    journal: Option<Journal>,
}

impl Aggregator {
    /// An aggregator for `workers` workers whose first window is the one
    /// containing `started_at`.
    pub fn new(
        length: WindowLength,
        workers: usize,
        started_at: SystemTime,
        store: Box<dyn DedupStore>,
    ) -> Self {
        let first = length.window_of(started_at);
        let gauges = Arc::<AggregatorGauges>::default();
        let partitions = Partitions::inline(store.wants_new_ids(), gauges.batch_times.clone());
        Aggregator {
            length,
            open: BTreeMap::new(),
            next_close: first,
            watermarks: vec![first; workers],
            started_within: (started_at > first.as_system_time()).then_some(first),
            store,
            partitions,
            capacity_hint: 0,
            max_endpoints: 0,
            immediate: None,
            warned_held_up: None,
            gauges,
            journal: None,
        }
    }

    /// Publishes the aggregator's heartbeat, windows, late ids, queue depth and
    /// batch times in `gauges`. Before any id is ingested.
    pub fn with_gauges(mut self, gauges: Arc<AggregatorGauges>) -> Self {
        self.partitions.time_into(gauges.batch_times.clone());
        self.gauges = gauges;
        self
    }

    /// Splits the windows' ids by hash over `parts` owner threads (1: the
    /// aggregator inserts them itself). Before any id is ingested.
    pub fn with_partitions(mut self, parts: usize) -> std::io::Result<Self> {
        let report_new = self.store.wants_new_ids();
        self.partitions = Partitions::new(parts, report_new, self.gauges.batch_times.clone())?;
        Ok(self)
    }

    /// Journals the ids new to this instance in `journal`, and takes back the
    /// windows it held at start (`recovered`): an open one goes on counting into
    /// the same set, one that ended is published now. After
    /// [`Aggregator::with_partitions`], before any id is ingested.
    pub fn with_journal(mut self, mut journal: Journal, recovered: Vec<RecoveredWindow>) -> Self {
        let first_covered = match self.started_within {
            Some(first) => self.length.next(first),
            None => self.next_close,
        };
        journal.covered_from(first_covered);
        self.partitions.report_new_ids();
        for window in recovered {
            self.recover(&mut journal, window);
        }
        self.journal = Some(journal);
        self
    }

    fn recover(&mut self, journal: &mut Journal, recovered: RecoveredWindow) {
        let window = recovered.window;
        tracing::info!(
            window_start = %window,
            ids = recovered.ids.len(),
            published_revision = recovered.published_revision,
            "window read back from the journal"
        );
        // In Redis mode the ids may not have reached it: they go again (SADD
        // counts each once).
        self.store.add(window, &recovered.ids);
        if window >= self.next_close {
            self.partitions.restore(window, &recovered.ids);
            let open = self.open.entry(window).or_default();
            open.published_before = recovered.published_revision;
            if recovered.covers_start && self.started_within == Some(window) {
                self.started_within = None;
            }
            return;
        }
        let removed_by_store = self.store.removes_journal_files();
        if !recovered.needs_record && !removed_by_store {
            // Its last record is up to date: only the file was left.
            journal.settled(window);
            return;
        }
        let mut set = IdSet::with_capacity(recovered.ids.len());
        let unique_requests = set.insert_all(&recovered.ids, |_| {});
        self.store.close(ClosedWindow {
            window,
            ids: vec![set],
            unique_requests,
            endpoints: Vec::new(),
            // The process that had it died before it ended.
            partial: true,
            published_before: recovered.published_revision,
        });
        match removed_by_store {
            true => journal.handed_over(window),
            false => journal.settled(window),
        }
    }

    /// Remembers up to `max_endpoints` endpoints per window for the callbacks, and
    /// with `immediate`, calls them as batches arrive instead of at close.
    pub fn with_endpoints(mut self, max_endpoints: usize, immediate: Option<Callbacks>) -> Self {
        self.max_endpoints = max_endpoints;
        self.immediate = immediate;
        self
    }

    /// Receives handoffs until every worker is gone, closing windows as workers
    /// pass them, then closes what is left (see [`Aggregator::finish`]) and returns
    /// the store, for the caller to let it finish reporting.
    pub fn run(mut self, handoffs: Receiver<Handoff>) -> Box<dyn DedupStore> {
        // Owners report new ids on a channel of their own: when the workers go
        // quiet, look at it this often, so that new ids reach a Redis store soon
        // after they were inserted rather than at the next heartbeat.
        let wait = self.partitions.new_ids_pending_poll().unwrap_or(HEARTBEAT);
        loop {
            self.beat(handoffs.len());
            match handoffs.recv_timeout(wait) {
                Ok(handoff) => self.receive(handoff),
                Err(RecvTimeoutError::Timeout) => self.forward_new_ids(),
                Err(RecvTimeoutError::Disconnected) => break,
            }
            // Written once the workers' channel runs empty: one write for all
            // the batches that were waiting, and none while nothing comes.
            if handoffs.is_empty() {
                if let Some(journal) = &mut self.journal {
                    journal.write();
                }
            }
        }
        self.finish(SystemTime::now())
    }

    /// Hands the new ids the owners reported so far to the journal and the store.
    fn forward_new_ids(&mut self) {
        let (store, journal) = (&mut self.store, &mut self.journal);
        self.partitions
            .forward_new_ids(&mut |window, ids| new_ids(store, journal, window, ids));
    }

    pub fn receive(&mut self, handoff: Handoff) {
        match handoff {
            Handoff::Ids(batch) => self.ingest(batch),
            Handoff::Watermark(mark) => self.advance(mark),
        }
    }

    /// Adds a batch of ids to its window's set.
    pub fn ingest(&mut self, batch: Batch) {
        if batch.window < self.next_close {
            // Workers never send ids of a window they have passed, and a window closes
            // only once all have: this is a bug, and the ids must not open the
            // window a second time.
            let late_ids = batch.ids.len() as u64;
            self.gauges.late_ids.fetch_add(late_ids, Ordering::Relaxed);
            tracing::error!(
                window_start = %batch.window,
                ids = batch.ids.len(),
                "ids arrived for a window already closed (a bug); not counted"
            );
            return;
        }
        let window = self.open.entry(batch.window).or_default();
        let expected = self.capacity_hint.max(batch.ids.len());
        let (store, journal) = (&mut self.store, &mut self.journal);
        self.partitions
            .insert(batch.window, &batch.ids, expected, &mut |window, ids| {
                new_ids(store, journal, window, ids)
            });
        for endpoint in batch.endpoints {
            let known = window.endpoints.contains(&endpoint);
            if !known && window.endpoints.len() >= self.max_endpoints {
                window.endpoints_over_cap += 1;
                continue;
            }
            if let Some(callbacks) = &mut self.immediate {
                let record = CountRecord::so_far(
                    batch.window,
                    self.length,
                    self.partitions.count_so_far(batch.window),
                    SoFar::Instance {
                        partial: self.started_within == Some(batch.window),
                    },
                );
                callbacks.submit(CallbackJob {
                    endpoint: endpoint.clone(),
                    record,
                });
            }
            if !known {
                window.endpoints.insert(endpoint);
            }
        }
    }

    /// Takes in a worker's watermark and closes every window all workers have passed.
    pub fn advance(&mut self, mark: Watermark) {
        let watermark = &mut self.watermarks[mark.worker];
        *watermark = (*watermark).max(mark.window);
        let passed = self.watermarks.iter().min().copied();
        while let Some(passed) = passed.filter(|&passed| self.next_close < passed) {
            self.skip_a_gap_before(passed);
            if self.next_close < passed {
                self.close_next(false);
            }
        }
    }

    /// Skips the windows without ids from the next to close onwards, if more than
    /// [`MAX_EMPTY_WINDOWS_AT_ONCE`] of them, spanning more than [`SKIPPED_AFTER`],
    /// are about to close before `until`.
    fn skip_a_gap_before(&mut self, until: WindowStart) {
        let first_with_ids = self.open.keys().next().copied();
        let gap_end = first_with_ids.map_or(until, |first| first.min(until));
        let skipped = self.length.windows_between(self.next_close, gap_end);
        let span = Duration::from_secs(skipped.saturating_mul(self.length.as_secs()));
        if skipped <= MAX_EMPTY_WINDOWS_AT_ONCE || span <= SKIPPED_AFTER {
            return;
        }
        tracing::warn!(
            from = %self.next_close,
            to = %gap_end,
            windows = skipped,
            "the clock jumped forward (or the process was frozen): windows without ids \
             skipped, not reported one by one"
        );
        self.gauges
            .windows_skipped
            .fetch_add(skipped, Ordering::Relaxed);
        self.next_close = gap_end;
    }

    /// Closes everything at shutdown, once every worker is gone (so every id is
    /// in): windows that ended by `now` are complete; the one containing `now` is
    /// partial, as is any later one (a clock that stepped back). Returns the store,
    /// to finish reporting.
    pub fn finish(mut self, now: SystemTime) -> Box<dyn DedupStore> {
        let last_open = self.open.keys().next_back().copied();
        let last = self
            .length
            .window_of(now)
            .max(self.next_close)
            .max(last_open.unwrap_or(self.next_close));
        while self.next_close <= last {
            self.skip_a_gap_before(last);
            let stopped_within = self.length.end_of(self.next_close) > now;
            self.close_next(stopped_within);
        }
        self.store
    }

    /// Ids that arrived after their window was closed, since start.
    #[cfg(test)]
    fn late_ids(&self) -> u64 {
        self.gauges.late_ids.load(Ordering::Relaxed)
    }

    /// Publishes the heartbeat and queue depth, and warns once per window when a
    /// worker holds up its close.
    fn beat(&mut self, queued: usize) {
        let gauges = &self.gauges;
        gauges
            .heartbeat_ms
            .store(Timestamp::now().unix_millis(), Ordering::Relaxed);
        gauges.channel_depth.store(queued as u64, Ordering::Relaxed);
        if queued as u64 > gauges.channel_depth_peak.load(Ordering::Relaxed) {
            gauges
                .channel_depth_peak
                .store(queued as u64, Ordering::Relaxed);
        }
        let due = self.length.end_of(self.next_close);
        let due_ms = due
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        gauges.next_close_due_ms.store(due_ms, Ordering::Relaxed);
        let held_up = SystemTime::now()
            .duration_since(due)
            .is_ok_and(|late| late > HELD_UP_AFTER);
        if held_up && self.warned_held_up != Some(self.next_close) {
            self.warned_held_up = Some(self.next_close);
            let waiting_for: Vec<usize> = (0..self.watermarks.len())
                .filter(|&w| self.watermarks[w] <= self.next_close)
                .collect();
            tracing::warn!(
                window_start = %self.next_close,
                workers = ?waiting_for,
                "a window cannot close: these workers have not handed over its ids yet"
            );
        }
    }

    fn close_next(&mut self, stopped_within: bool) {
        let window = self.next_close;
        self.next_close = self.length.next(window);
        // Take the set out whole: removing it from the partitions is the close.
        let open = self.open.remove(&window).unwrap_or_default();
        let (store, journal) = (&mut self.store, &mut self.journal);
        let ids = self.partitions.close(window, &mut |window, ids| {
            new_ids(store, journal, window, ids)
        });
        let unique_requests = ids.iter().map(IdSet::len).sum();
        let partial = stopped_within || self.started_within == Some(window);
        if !partial {
            self.capacity_hint = unique_requests as usize;
        }
        if open.endpoints_over_cap > 0 {
            tracing::warn!(
                window_start = %window,
                endpoints_over_cap = open.endpoints_over_cap,
                "endpoint mentions beyond VERVE_CALLBACK_MAX_ENDPOINTS were not called back"
            );
        }
        let endpoints = match self.immediate {
            Some(_) => Vec::new(),
            None => open.endpoints.into_iter().collect(),
        };
        self.gauges.windows_closed.fetch_add(1, Ordering::Relaxed);
        let removed_by_store = self.store.removes_journal_files();
        if let (Some(journal), false, true) = (&mut self.journal, removed_by_store, stopped_within)
        {
            // Noted before the record goes out: a crash in between makes the next
            // start skip a revision, never use one twice.
            let revision = open.published_before + 1;
            journal.published_partial(window, revision, unique_requests);
        }
        self.store.close(ClosedWindow {
            window,
            ids,
            unique_requests,
            endpoints,
            partial,
            published_before: open.published_before,
        });
        if let Some(journal) = &mut self.journal {
            if removed_by_store {
                journal.handed_over(window);
            } else if !stopped_within {
                journal.settled(window);
            }
        }
    }
}

/// Ids new to this instance in `window`: to the journal, and to the store.
fn new_ids(
    store: &mut Box<dyn DedupStore>,
    journal: &mut Option<Journal>,
    window: WindowStart,
    ids: &[i64],
) {
    if let Some(journal) = journal {
        journal.append(window, ids);
    }
    store.add(window, ids);
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::admission::Admission;
    use crate::batch::Batcher;
    use crate::config::{CallbackTiming, JournalFsync};
    use crate::journal::JournalGauges;
    use crate::report::Reporter;
    use crate::sink::CountSink;
    use crate::store::LocalStore;

    /// A sink that remembers what it was given.
    #[derive(Clone, Default)]
    struct Recorded(Arc<Mutex<Vec<CountRecord>>>);

    impl CountSink for Recorded {
        fn publish(&mut self, record: &CountRecord) {
            self.0.lock().unwrap().push(*record);
        }
    }

    impl Recorded {
        fn counts(&self) -> Vec<(u64, u64, bool)> {
            let records = self.0.lock().unwrap();
            records
                .iter()
                .map(|r| (r.window_start.unix_secs(), r.unique_requests, r.partial))
                .collect()
        }
    }

    fn at_ms(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn window(secs: u64) -> WindowStart {
        WindowStart::from_unix_secs(secs)
    }

    fn batch(window_start: u64, ids: &[i64]) -> Batch {
        with_endpoints(window_start, ids, &[])
    }

    /// A local store reporting to `recorded` and, if given, close-time callbacks.
    fn store(recorded: &Recorded, callbacks: Option<Callbacks>) -> Box<dyn DedupStore> {
        let reporter = Reporter::new(vec![Box::new(recorded.clone())], callbacks, Arc::default());
        Box::new(LocalStore::new(reporter, WindowLength::from_secs(60)))
    }

    /// 60 s windows, `workers` workers, started at 100.000 s (window 60).
    fn aggregator_of(workers: usize) -> (Aggregator, Recorded) {
        let recorded = Recorded::default();
        let agg = Aggregator::new(
            WindowLength::from_secs(60),
            workers,
            at_ms(100_000),
            store(&recorded, None),
        );
        (agg, recorded)
    }

    fn aggregator() -> (Aggregator, Recorded) {
        aggregator_of(1)
    }

    /// Every worker of `agg` passes into the window starting at `secs`.
    fn pass(agg: &mut Aggregator, secs: u64) {
        for worker in 0..agg.watermarks.len() {
            agg.advance(Watermark {
                worker,
                window: window(secs),
            });
        }
    }

    #[test]
    fn counts_distinct_ids_across_batches() {
        let (mut agg, recorded) = aggregator();
        agg.ingest(batch(60, &[1, 2, 3, 2]));
        agg.ingest(batch(60, &[3, 4, i64::MIN, i64::MAX, 1]));
        pass(&mut agg, 120);
        assert_eq!(recorded.counts(), vec![(60, 6, true)]);
    }

    #[test]
    fn a_window_closes_once_every_worker_has_passed_it() {
        let (mut agg, recorded) = aggregator_of(2);
        agg.ingest(batch(60, &[1]));
        agg.advance(Watermark {
            worker: 0,
            window: window(180),
        });
        assert_eq!(recorded.counts(), vec![]);
        agg.advance(Watermark {
            worker: 1,
            window: window(120),
        });
        assert_eq!(recorded.counts(), vec![(60, 1, true)]);
        agg.advance(Watermark {
            worker: 1,
            window: window(180),
        });
        assert_eq!(recorded.counts(), vec![(60, 1, true), (120, 0, false)]);
    }

    #[test]
    fn the_first_window_is_partial_unless_the_service_started_on_its_boundary() {
        let (mut agg, recorded) = aggregator();
        pass(&mut agg, 120);
        let on_boundary = Recorded::default();
        let mut exact = Aggregator::new(
            WindowLength::from_secs(60),
            1,
            at_ms(60_000),
            store(&on_boundary, None),
        );
        pass(&mut exact, 120);
        assert_eq!(recorded.counts(), vec![(60, 0, true)]);
        assert_eq!(on_boundary.counts(), vec![(60, 0, false)]);
    }

    #[test]
    fn the_same_id_counts_again_in_the_next_window() {
        let (mut agg, recorded) = aggregator();
        agg.ingest(batch(60, &[7, 8]));
        // The next window's ids may arrive before the previous window closes.
        agg.ingest(batch(120, &[7]));
        pass(&mut agg, 180);
        assert_eq!(recorded.counts(), vec![(60, 2, true), (120, 1, false)]);
    }

    #[test]
    fn idle_windows_are_reported_with_zero() {
        let (mut agg, recorded) = aggregator();
        agg.ingest(batch(180, &[1]));
        pass(&mut agg, 240);
        assert_eq!(
            recorded.counts(),
            vec![(60, 0, true), (120, 0, false), (180, 1, false)]
        );
    }

    #[test]
    fn a_clock_jump_skips_the_empty_windows_with_one_line() {
        let (mut agg, recorded) = aggregator();
        agg.ingest(batch(60, &[1]));
        // A day later; ids arrive for the new window before the workers pass it.
        agg.ingest(batch(86_460, &[2, 3]));
        pass(&mut agg, 86_520);
        assert_eq!(recorded.counts(), vec![(60, 1, true), (86_460, 2, false)]);
        assert_eq!(agg.gauges.windows_skipped.load(Ordering::Relaxed), 1_439);
        // An hour of empty windows at once (a stall, not a jump) is still reported
        // one by one.
        pass(&mut agg, 86_520 + 3_600);
        assert_eq!(recorded.counts().len(), 2 + 60);
        // A jump at shutdown is skipped the same way.
        let recorded_before = recorded.counts().len();
        agg.finish(at_ms((86_520 + 3_600 + 7_200) * 1000 + 500));
        assert_eq!(
            recorded.counts().len(),
            recorded_before + 1,
            "the last, partial"
        );
        assert_eq!(
            recorded.counts().last(),
            Some(&(86_520 + 3_600 + 7_200, 0, true))
        );
    }

    #[test]
    fn ids_for_a_closed_window_are_refused_not_reopened() {
        let (mut agg, recorded) = aggregator();
        pass(&mut agg, 120);
        agg.ingest(batch(60, &[1, 2]));
        assert_eq!(agg.late_ids(), 2);
        pass(&mut agg, 180);
        assert_eq!(recorded.counts(), vec![(60, 0, true), (120, 0, false)]);
    }

    #[test]
    fn finish_closes_ended_windows_normally_and_the_current_one_as_partial() {
        let (mut agg, recorded) = aggregator();
        agg.ingest(batch(60, &[1, 2]));
        agg.ingest(batch(120, &[3]));
        // Shut down 200 ms into window 120, before any worker had passed window 60.
        agg.finish(at_ms(120_200));
        assert_eq!(recorded.counts(), vec![(60, 2, true), (120, 1, true)]);
    }

    #[test]
    fn a_window_that_ends_as_the_service_stops_is_complete() {
        let recorded = Recorded::default();
        let agg = Aggregator::new(
            WindowLength::from_secs(60),
            1,
            at_ms(60_000),
            store(&recorded, None),
        );
        agg.finish(at_ms(120_000));
        assert_eq!(recorded.counts(), vec![(60, 0, false), (120, 0, true)]);
    }

    #[test]
    fn finish_reports_later_windows_too() {
        let (mut agg, recorded) = aggregator();
        agg.ingest(batch(180, &[9]));
        agg.finish(at_ms(100_000));
        assert_eq!(
            recorded.counts(),
            vec![(60, 0, true), (120, 0, true), (180, 1, true)]
        );
    }

    #[test]
    fn counts_are_the_inserts_not_the_set_size() {
        let (mut agg, recorded) = aggregator();
        let ids: Vec<i64> = (0..100_000).map(|i| i % 70_001).collect();
        for chunk in ids.chunks(512) {
            agg.ingest(batch(60, chunk));
        }
        pass(&mut agg, 120);
        assert_eq!(recorded.counts(), vec![(60, 70_001, true)]);
    }

    /// The case a fixed grace gets wrong: one worker is held up long after the
    /// window ended, with ids it has already answered `ok` in its batch.
    #[test]
    fn a_held_up_worker_keeps_its_window_open_and_loses_no_id() {
        let (mut agg, recorded) = aggregator_of(2);
        let (tx, rx) = flume::bounded(64);
        let mut prompt = Batcher::new(tx.clone(), 512, Admission::default(), 0, window(60));
        let mut held_up = Batcher::new(tx, 512, Admission::default(), 1, window(60));
        prompt.push(window(60), 1, None).unwrap();
        held_up.push(window(60), 2, None).unwrap();
        held_up.push(window(60), 3, None).unwrap();
        // The prompt worker flushes at every tick, minutes past the window's end.
        prompt.flush(window(120));
        prompt.flush(window(180));
        prompt.flush(window(240));
        rx.drain().for_each(|h| agg.receive(h));
        assert_eq!(recorded.counts(), vec![]);
        // The held-up worker comes back; its first tick hands its ids over.
        held_up.flush(window(240));
        rx.drain().for_each(|h| agg.receive(h));
        assert_eq!(
            recorded.counts(),
            vec![(60, 3, true), (120, 0, false), (180, 0, false)]
        );
    }

    #[test]
    fn run_waits_for_a_held_up_worker_thread_and_finishes_when_workers_are_gone() {
        let recorded = Recorded::default();
        let length = WindowLength::from_secs(1);
        let started_at = SystemTime::now();
        let first = length.window_of(started_at);
        let agg = Aggregator::new(length, 2, started_at, store(&recorded, None));
        let (tx, rx) = flume::bounded(64);
        let aggregator = std::thread::spawn(move || agg.run(rx));
        let mut prompt = Batcher::new(tx.clone(), 512, Admission::default(), 0, first);
        let mut held_up = Batcher::new(tx, 512, Admission::default(), 1, first);
        prompt.push(first, 1, None).unwrap();
        held_up.push(first, 2, None).unwrap();
        // The prompt worker ticks on past the window's end; the other one sleeps
        // through it, as a descheduled thread would, holding an accepted id.
        let past = length.next(length.next(first));
        while length.window_of(SystemTime::now()) < past {
            prompt.flush(length.window_of(SystemTime::now()));
            std::thread::sleep(Duration::from_millis(10));
        }
        prompt.flush(past);
        assert!(
            recorded.counts().is_empty(),
            "closed without the held-up worker"
        );
        held_up.flush(past);
        let closed = |r: &Recorded| r.counts().first().copied();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while closed(&recorded).is_none() {
            assert!(std::time::Instant::now() < deadline, "never closed");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            closed(&recorded).map(|c| (c.0, c.1)),
            Some((first.unix_secs(), 2))
        );
        prompt.finish();
        held_up.finish();
        drop((prompt, held_up));
        aggregator.join().unwrap().finish(std::time::Instant::now());
    }

    /// What a store was told about a window: new ids (`Ok`), or its close with
    /// the count (`Err`).
    type Tale = (u64, Result<Vec<i64>, u64>);

    /// What a store was told, in order.
    #[derive(Clone, Default)]
    struct Told(Arc<Mutex<Vec<Tale>>>);

    impl DedupStore for Told {
        fn wants_new_ids(&self) -> bool {
            true
        }
        fn add(&mut self, window: WindowStart, ids: &[i64]) {
            let told = (window.unix_secs(), Ok(ids.to_vec()));
            self.0.lock().unwrap().push(told);
        }
        fn close(&mut self, closed: ClosedWindow) {
            let in_parts: u64 = closed.ids.iter().map(IdSet::len).sum();
            assert_eq!(in_parts, closed.unique_requests);
            let told = (closed.window.unix_secs(), Err(closed.unique_requests));
            self.0.lock().unwrap().push(told);
        }
    }

    #[test]
    fn partitions_count_exactly_and_hand_every_new_id_over_before_the_close() {
        for parts in [1, 3] {
            let told = Told::default();
            let store = Box::new(told.clone());
            let mut agg = Aggregator::new(WindowLength::from_secs(60), 1, at_ms(100_000), store)
                .with_partitions(parts)
                .unwrap();
            // Repeats within and across batches, and the same ids in the next window.
            let ids: Vec<i64> = (0..20_000).map(|i| (i * 7919) % 6_007 - 3_000).collect();
            for chunk in ids.chunks(512) {
                agg.ingest(batch(60, chunk));
                agg.ingest(batch(120, &chunk[..100.min(chunk.len())]));
            }
            pass(&mut agg, 180);
            let told = told.0.lock().unwrap();
            for (window, distinct) in [(60, 6_007), (120, ids_in_firsts(&ids))] {
                let close = told
                    .iter()
                    .position(|(w, t)| *w == window && t.is_err())
                    .expect("closed");
                assert_eq!(
                    told[close].1,
                    Err(distinct),
                    "{parts} parts, window {window}"
                );
                let mut added = HashSet::new();
                for (w, t) in told.iter() {
                    if let (true, Ok(ids)) = (*w == window, t) {
                        assert!(ids.iter().all(|&id| added.insert(id)), "an id added twice");
                    }
                }
                let added_before: usize = told[..close]
                    .iter()
                    .filter(|(w, _)| *w == window)
                    .map(|(_, t)| t.as_ref().map_or(0, Vec::len))
                    .sum();
                assert_eq!(
                    added_before as u64, distinct,
                    "every new id before the close"
                );
            }
        }
    }

    /// (window, count, revision, partial) of each record, in order.
    fn revisions(recorded: &Recorded) -> Vec<(u64, u64, u64, bool)> {
        let records = recorded.0.lock().unwrap();
        let summary = |r: &CountRecord| {
            let window = r.window_start.unix_secs();
            (window, r.unique_requests, r.revision, r.partial)
        };
        records.iter().map(summary).collect()
    }

    /// An aggregator of 60 s windows started at `started_ms` with `parts`
    /// partitions, journalling into `dir`; the records it reports; its journal's
    /// gauges.
    fn journalled(
        dir: &std::path::Path,
        started_ms: u64,
        parts: usize,
    ) -> (Aggregator, Recorded, Arc<JournalGauges>) {
        let gauges = Arc::new(JournalGauges::default());
        let (journal, recovered) = Journal::open(
            dir,
            WindowLength::from_secs(60),
            JournalFsync::Never,
            gauges.clone(),
        )
        .unwrap();
        let recorded = Recorded::default();
        let length = WindowLength::from_secs(60);
        let agg = Aggregator::new(length, 1, at_ms(started_ms), store(&recorded, None))
            .with_partitions(parts)
            .unwrap()
            .with_journal(journal, recovered);
        (agg, recorded, gauges)
    }

    fn journal_files(dir: &std::path::Path) -> usize {
        let files = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path());
        files
            .filter(|p| p.extension().is_some_and(|e| e == "journal"))
            .count()
    }

    #[test]
    fn the_journal_brings_back_open_windows_and_publishes_those_that_ended() {
        for parts in [1, 2] {
            let dir = tempfile::tempdir().unwrap();
            // Up since 59.5 s, so window 60 is covered from its start.
            let (mut first, _, gauges) = journalled(dir.path(), 59_500, parts);
            pass(&mut first, 60);
            first.ingest(batch(60, &[1, 2, 3, 2]));
            first.ingest(batch(120, &[4, 5]));
            // What the run loop does while idle, until the owners' new ids are in.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while gauges.ids_written.load(Ordering::Relaxed) < 5 {
                assert!(std::time::Instant::now() < deadline, "never journalled");
                first.forward_new_ids();
                first.journal.as_mut().unwrap().write();
                std::thread::sleep(Duration::from_millis(1));
            }
            // Killed: what the run loop wrote is all that is left.
            drop(first);
            assert_eq!(journal_files(dir.path()), 2);

            // Back at 130 s: window 60 ended meanwhile, 120 is still open.
            let (mut second, recorded, _) = journalled(dir.path(), 130_000, parts);
            assert_eq!(
                revisions(&recorded),
                vec![(60, 3, 1, true)],
                "{parts} parts"
            );
            second.ingest(batch(120, &[5, 6]));
            pass(&mut second, 180);
            // 120 went on in the same set, and the first run covered its start.
            let whole = (120, 3, 1, false);
            assert_eq!(revisions(&recorded), vec![(60, 3, 1, true), whole]);
            assert_eq!(journal_files(dir.path()), 0, "published for good: deleted");
        }
    }

    #[test]
    fn a_stop_within_a_window_and_a_start_within_it_end_in_the_next_revision() {
        let dir = tempfile::tempdir().unwrap();
        let (mut first, stopped, _) = journalled(dir.path(), 59_500, 1);
        pass(&mut first, 60);
        first.ingest(batch(60, &[1, 2]));
        first.finish(at_ms(70_000));
        assert_eq!(revisions(&stopped)[1..], [(60, 2, 1, true)]);
        assert_eq!(journal_files(dir.path()), 1, "kept for the restart");

        let (mut second, recorded, _) = journalled(dir.path(), 80_000, 1);
        second.ingest(batch(60, &[2, 3]));
        pass(&mut second, 120);
        assert_eq!(revisions(&recorded), vec![(60, 3, 2, false)]);
        assert_eq!(journal_files(dir.path()), 0);
        drop(second);

        // Stopped within a window again and started after it ended, with no id
        // since: the record out is up to date, and the file goes without another.
        let (mut third, _, _) = journalled(dir.path(), 130_000, 1);
        third.ingest(batch(120, &[7]));
        third.finish(at_ms(140_000));
        let (_, recorded, _) = journalled(dir.path(), 200_000, 1);
        assert_eq!(revisions(&recorded), vec![]);
        assert_eq!(journal_files(dir.path()), 0);
    }

    /// Distinct ids among the first 100 of each 512-id chunk of `ids`.
    fn ids_in_firsts(ids: &[i64]) -> u64 {
        let firsts = ids
            .chunks(512)
            .flat_map(|chunk| &chunk[..100.min(chunk.len())]);
        firsts.collect::<HashSet<_>>().len() as u64
    }

    fn with_endpoints(window_start: u64, ids: &[i64], endpoints: &[&str]) -> Batch {
        Batch {
            window: WindowStart::from_unix_secs(window_start),
            ids: ids.to_vec(),
            endpoints: endpoints.iter().map(|&e| Arc::from(e)).collect(),
        }
    }

    fn with_calls(
        timing: CallbackTiming,
        max_endpoints: usize,
    ) -> (Aggregator, flume::Receiver<CallbackJob>) {
        let (callbacks, jobs) = Callbacks::detached(64, false);
        let (at_close, immediate) = match timing {
            CallbackTiming::Close => (Some(callbacks), None),
            CallbackTiming::Immediate => (None, Some(callbacks)),
        };
        let agg = Aggregator::new(
            WindowLength::from_secs(60),
            1,
            at_ms(100_000),
            store(&Recorded::default(), at_close),
        );
        (agg.with_endpoints(max_endpoints, immediate), jobs)
    }

    fn calls(jobs: &flume::Receiver<CallbackJob>) -> Vec<(String, u64, u64, bool)> {
        jobs.drain()
            .map(|j| {
                (
                    j.endpoint.to_string(),
                    j.record.window_start.unix_secs(),
                    j.record.unique_requests,
                    j.record.is_final(),
                )
            })
            .collect()
    }

    #[test]
    fn close_mode_calls_each_endpoint_once_per_window_with_the_final_count() {
        let (mut agg, jobs) = with_calls(CallbackTiming::Close, 10);
        agg.ingest(with_endpoints(120, &[1, 2], &["http://a/", "http://b/"]));
        agg.ingest(with_endpoints(120, &[2, 3], &["http://a/"]));
        agg.ingest(with_endpoints(180, &[1], &["http://a/"]));
        assert_eq!(calls(&jobs), vec![]);
        pass(&mut agg, 180);
        let mut got = calls(&jobs);
        got.sort();
        assert_eq!(
            got,
            vec![
                ("http://a/".into(), 120, 3, true),
                ("http://b/".into(), 120, 3, true)
            ]
        );
        pass(&mut agg, 240);
        assert_eq!(calls(&jobs), vec![("http://a/".into(), 180, 1, true)]);
    }

    #[test]
    fn a_partial_window_is_not_final_for_callbacks() {
        let (mut agg, jobs) = with_calls(CallbackTiming::Close, 10);
        agg.ingest(with_endpoints(60, &[1], &["http://a/"]));
        pass(&mut agg, 120);
        assert_eq!(calls(&jobs), vec![("http://a/".into(), 60, 1, false)]);
    }

    #[test]
    fn immediate_mode_calls_with_the_count_so_far() {
        let (mut agg, jobs) = with_calls(CallbackTiming::Immediate, 10);
        agg.ingest(with_endpoints(60, &[1, 2], &["http://a/"]));
        agg.ingest(with_endpoints(60, &[2, 3, 4], &["http://a/"]));
        assert_eq!(
            calls(&jobs),
            vec![
                ("http://a/".into(), 60, 2, false),
                ("http://a/".into(), 60, 4, false)
            ]
        );
        pass(&mut agg, 120);
        assert_eq!(calls(&jobs), vec![], "no extra call at close");
    }

    #[test]
    fn endpoints_beyond_the_cap_are_not_called() {
        let (mut agg, jobs) = with_calls(CallbackTiming::Close, 2);
        agg.ingest(with_endpoints(
            60,
            &[1],
            &["http://a/", "http://b/", "http://c/"],
        ));
        agg.ingest(with_endpoints(60, &[2], &["http://a/", "http://d/"]));
        pass(&mut agg, 120);
        let mut got: Vec<_> = calls(&jobs).into_iter().map(|c| c.0).collect();
        got.sort();
        assert_eq!(got, vec!["http://a/", "http://b/"]);
    }
}
