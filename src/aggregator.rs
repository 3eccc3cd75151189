//! The aggregator: one thread that owns every open window's set of ids.
//!
//! Workers send it [`Batch`]es; it inserts each id into the `scc::HashSet` of the
//! batch's window and tells the [`DedupStore`] which ids were new to this instance.
//! A window is closed `grace` after it ends, by removing its set from the map whole
//! and handing it to the store, which settles and reports the count: there is no
//! moment at which ids can slip in between counting and clearing. Windows close
//! strictly in order, so a window that received nothing is reported with 0.
//!
//! The aggregator also remembers, per window, the distinct endpoints requests named
//! (at most `VERVE_CALLBACK_MAX_ENDPOINTS`; mentions beyond are counted and logged):
//! they go with the closed window to be called back with its count, or, in
//! immediate timing, are called as batches arrive, with the count so far.
//!
//! Invariants: every window from the one the service started in to the one it
//! stops in is closed exactly once; a batch for a window that is already closed
//! (only possible if a worker was held up for longer than the grace) is counted as
//! late and logged, never silently merged into another window.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use flume::{Receiver, RecvTimeoutError};

use crate::batch::Batch;
use crate::callback::{CallbackJob, Callbacks};
use crate::metrics::{self, Telemetry};
use crate::report::ClosedWindow;
use crate::store::{DedupStore, IdSet};
use crate::window::{WindowLength, WindowStart};

/// The longest the aggregator waits without a heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// What the aggregator holds for a window until it closes.
struct OpenWindow {
    ids: Arc<IdSet>,
    endpoints: HashSet<Arc<str>>,
    /// Endpoint mentions refused because `endpoints` was full.
    endpoints_over_cap: u64,
}

impl OpenWindow {
    fn with_capacity(capacity: usize) -> Self {
        OpenWindow {
            ids: Arc::new(IdSet::with_capacity(capacity)),
            endpoints: HashSet::new(),
            endpoints_over_cap: 0,
        }
    }
}

pub struct Aggregator {
    length: WindowLength,
    grace: Duration,
    open: BTreeMap<WindowStart, OpenWindow>,
    /// The oldest window not yet closed; all earlier ones are.
    next_close: WindowStart,
    store: Box<dyn DedupStore>,
    /// The size of the last closed window: new sets start at this capacity, since
    /// traffic changes little from one window to the next and growing a set of
    /// millions of ids step by step costs far more than reserving it once.
    capacity_hint: usize,
    /// Distinct endpoints remembered per window; 0 ignores endpoints.
    max_endpoints: usize,
    /// Immediate timing: callbacks with the count so far, as batches arrive.
    immediate: Option<Callbacks>,
    /// Shutdown is closing windows before their grace has passed.
    closing_early: bool,
    /// Ids of the batch being ingested that were new to this instance (reused).
    new_ids: Vec<i64>,
    telemetry: Arc<Telemetry>,
}

impl Aggregator {
    /// An aggregator whose first window is the one containing `started_at`.
    pub fn new(
        length: WindowLength,
        grace: Duration,
        started_at: SystemTime,
        store: Box<dyn DedupStore>,
    ) -> Self {
        Aggregator {
            length,
            grace,
            open: BTreeMap::new(),
            next_close: length.window_of(started_at),
            store,
            capacity_hint: 0,
            max_endpoints: 0,
            immediate: None,
            new_ids: Vec::new(),
            closing_early: false,
            telemetry: Arc::default(),
        }
    }

    /// Reports the aggregator's heartbeat, late ids and queue depth to `telemetry`.
    pub fn with_telemetry(mut self, telemetry: Arc<Telemetry>) -> Self {
        self.telemetry = telemetry;
        self
    }

    /// Remembers up to `max_endpoints` endpoints per window for the callbacks, and
    /// with `immediate`, calls them as batches arrive instead of at close.
    pub fn with_endpoints(mut self, max_endpoints: usize, immediate: Option<Callbacks>) -> Self {
        self.max_endpoints = max_endpoints;
        self.immediate = immediate;
        self
    }

    /// Receives batches until every sender is gone, closing windows as they fall due,
    /// then closes what is left (see [`Aggregator::finish`]) and lets the store
    /// report it, waiting for the store at most until `store_deadline` after that.
    pub fn run(mut self, batches: Receiver<Batch>, store_deadline: Duration) {
        loop {
            let now = SystemTime::now();
            self.telemetry
                .aggregator_heartbeat_ms
                .store(metrics::now_ms(), Ordering::Relaxed);
            self.telemetry
                .channel_depth
                .store(batches.len() as u64, Ordering::Relaxed);
            let deadline = self.next_deadline();
            if now >= deadline {
                // Batches already queued were sealed before now: they may belong to
                // the window about to close, so they go in first.
                for batch in batches.try_iter().take(batches.len()) {
                    self.ingest(batch);
                }
                self.close_due(now);
                continue;
            }
            // Wakes at least once a second, so that /healthz sees a heartbeat.
            let wait = deadline
                .duration_since(now)
                .unwrap_or_default()
                .min(HEARTBEAT);
            match batches.recv_timeout(wait) {
                Ok(batch) => self.ingest(batch),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        self.finish(SystemTime::now(), Instant::now() + store_deadline);
    }

    /// Adds a batch of ids to its window's set.
    pub fn ingest(&mut self, batch: Batch) {
        if batch.window < self.next_close {
            let late_ids = batch.ids.len() as u64;
            let late_total = self
                .telemetry
                .late_ids
                .fetch_add(late_ids, Ordering::Relaxed)
                + late_ids;
            tracing::warn!(
                window_start = %batch.window,
                ids = batch.ids.len(),
                late_ids_total = late_total,
                "ids arrived after their window was closed; not counted"
            );
            return;
        }
        let window = match self.open.entry(batch.window) {
            std::collections::btree_map::Entry::Occupied(open) => open.into_mut(),
            std::collections::btree_map::Entry::Vacant(vacant) => {
                let open = OpenWindow::with_capacity(self.capacity_hint.max(batch.ids.len()));
                self.store.opened(batch.window, &open.ids);
                vacant.insert(open)
            }
        };
        self.new_ids.clear();
        for id in batch.ids {
            // Err means the id was already in the set: exactly the repeat to drop.
            if window.ids.insert_sync(id).is_ok() {
                self.new_ids.push(id);
            }
        }
        if !self.new_ids.is_empty() {
            self.store.add(batch.window, &self.new_ids);
        }
        for endpoint in batch.endpoints {
            let known = window.endpoints.contains(&endpoint);
            if !known && window.endpoints.len() >= self.max_endpoints {
                window.endpoints_over_cap += 1;
                continue;
            }
            if let Some(callbacks) = &mut self.immediate {
                callbacks.submit(CallbackJob {
                    endpoint: endpoint.clone(),
                    window_start: batch.window,
                    window_secs: self.length.as_secs(),
                    unique_requests: window.ids.len() as u64,
                    final_count: false,
                });
            }
            if !known {
                window.endpoints.insert(endpoint);
            }
        }
    }

    /// When the oldest open window is due to close.
    pub fn next_deadline(&self) -> SystemTime {
        self.length.end_of(self.next_close) + self.grace
    }

    /// Closes every window whose grace has passed at `now`.
    pub fn close_due(&mut self, now: SystemTime) {
        while now >= self.next_deadline() {
            self.close_next(false);
        }
    }

    /// Closes everything at shutdown, once every worker has flushed: windows that
    /// ended by `now` are complete; the one containing `now` is closed early and
    /// marked partial, as is any later window (a clock that stepped back). Then the
    /// store gets until `store_deadline` to report them.
    pub fn finish(mut self, now: SystemTime, store_deadline: Instant) {
        while self.length.end_of(self.next_close) <= now {
            // Complete here, but closed before its grace if `now` is inside it:
            // other instances' last ids may not be in Redis yet.
            self.closing_early = now < self.next_deadline();
            self.close_next(false);
        }
        self.closing_early = true;
        self.close_next(true);
        while let Some(&last) = self.open.keys().next_back() {
            while self.next_close <= last {
                self.close_next(true);
            }
        }
        self.store.finish(store_deadline);
    }

    /// Ids that arrived after their window was closed, since start.
    pub fn late_ids(&self) -> u64 {
        self.telemetry.late_ids.load(Ordering::Relaxed)
    }

    fn close_next(&mut self, partial: bool) {
        let window = self.next_close;
        self.next_close = self.length.next(window);
        // Swap the set out whole: removing it from the map is the close.
        let open = self
            .open
            .remove(&window)
            .unwrap_or_else(|| OpenWindow::with_capacity(0));
        if !partial {
            self.capacity_hint = open.ids.len();
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
        self.store.close(ClosedWindow {
            window,
            ids: open.ids,
            endpoints,
            partial,
            before_grace: self.closing_early,
            closed_at: Instant::now(),
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::UNIX_EPOCH;

    use super::*;
    use crate::config::CallbackTiming;
    use crate::report::Reporter;
    use crate::sink::{CountSink, WindowReport};
    use crate::store::LocalStore;

    /// A sink that remembers what it was given.
    #[derive(Clone, Default)]
    struct Recorded(Arc<Mutex<Vec<WindowReport>>>);

    impl CountSink for Recorded {
        fn publish(&mut self, report: &WindowReport) {
            self.0.lock().unwrap().push(*report);
        }
    }

    impl Recorded {
        fn counts(&self) -> Vec<(u64, u64, bool)> {
            let reports = self.0.lock().unwrap();
            reports
                .iter()
                .map(|r| (r.window_start.unix_secs(), r.unique_requests, r.partial))
                .collect()
        }
    }

    fn at_ms(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn batch(window_secs: u64, ids: &[i64]) -> Batch {
        with_endpoints(window_secs, ids, &[])
    }

    /// A local store reporting to `recorded` and, if given, close-time callbacks.
    fn store(recorded: &Recorded, callbacks: Option<Callbacks>) -> Box<dyn DedupStore> {
        let reporter = Reporter::new(
            60,
            vec![Box::new(recorded.clone())],
            callbacks,
            Arc::default(),
        );
        Box::new(LocalStore::new(reporter))
    }

    /// 60 s windows, 500 ms grace, started at 100.000 s (window 60).
    fn aggregator() -> (Aggregator, Recorded) {
        let recorded = Recorded::default();
        let agg = Aggregator::new(
            WindowLength::from_secs(60),
            Duration::from_millis(500),
            at_ms(100_000),
            store(&recorded, None),
        );
        (agg, recorded)
    }

    #[test]
    fn counts_distinct_ids_across_batches() {
        let (mut agg, recorded) = aggregator();
        agg.ingest(batch(60, &[1, 2, 3, 2]));
        agg.ingest(batch(60, &[3, 4, i64::MIN, i64::MAX, 1]));
        agg.close_due(at_ms(120_500));
        assert_eq!(recorded.counts(), vec![(60, 6, false)]);
    }

    #[test]
    fn closes_exactly_at_end_plus_grace() {
        let (mut agg, recorded) = aggregator();
        agg.ingest(batch(60, &[1]));
        assert_eq!(agg.next_deadline(), at_ms(120_500));
        agg.close_due(at_ms(120_499));
        assert_eq!(recorded.counts(), vec![]);
        agg.close_due(at_ms(120_500));
        assert_eq!(recorded.counts(), vec![(60, 1, false)]);
        assert_eq!(agg.next_deadline(), at_ms(180_500));
    }

    #[test]
    fn the_same_id_counts_again_in_the_next_window() {
        let (mut agg, recorded) = aggregator();
        agg.ingest(batch(60, &[7, 8]));
        // The next window's ids may arrive before the previous window closes.
        agg.ingest(batch(120, &[7]));
        agg.close_due(at_ms(180_500));
        assert_eq!(recorded.counts(), vec![(60, 2, false), (120, 1, false)]);
    }

    #[test]
    fn idle_windows_are_reported_with_zero() {
        let (mut agg, recorded) = aggregator();
        agg.ingest(batch(180, &[1]));
        agg.close_due(at_ms(240_500));
        assert_eq!(
            recorded.counts(),
            vec![(60, 0, false), (120, 0, false), (180, 1, false)]
        );
    }

    #[test]
    fn late_batches_are_counted_apart() {
        let (mut agg, recorded) = aggregator();
        agg.close_due(at_ms(120_500));
        agg.ingest(batch(60, &[1, 2]));
        assert_eq!(agg.late_ids(), 2);
        agg.close_due(at_ms(180_500));
        assert_eq!(recorded.counts(), vec![(60, 0, false), (120, 0, false)]);
    }

    #[test]
    fn finish_closes_ended_windows_normally_and_the_current_one_as_partial() {
        let (mut agg, recorded) = aggregator();
        agg.ingest(batch(60, &[1, 2]));
        agg.ingest(batch(120, &[3]));
        // Shut down 200 ms into window 120, before window 60's grace had passed.
        agg.finish(at_ms(120_200), Instant::now());
        assert_eq!(recorded.counts(), vec![(60, 2, false), (120, 1, true)]);
    }

    #[test]
    fn finish_reports_later_windows_too() {
        let (mut agg, recorded) = aggregator();
        agg.ingest(batch(180, &[9]));
        agg.finish(at_ms(100_000), Instant::now());
        assert_eq!(
            recorded.counts(),
            vec![(60, 0, true), (120, 0, true), (180, 1, true)]
        );
    }

    #[test]
    fn run_drains_the_channel_and_finishes_when_workers_are_gone() {
        let recorded = Recorded::default();
        let now = SystemTime::now();
        let length = WindowLength::from_secs(3600);
        let agg = Aggregator::new(
            length,
            Duration::from_millis(500),
            now,
            store(&recorded, None),
        );
        let (tx, rx) = flume::bounded(4);
        let window = length.window_of(now);
        let thread = std::thread::spawn(move || agg.run(rx, Duration::ZERO));
        for chunk in [[1, 2], [2, 3], [4, 4]] {
            tx.send(Batch {
                window,
                ids: chunk.to_vec(),
                endpoints: Vec::new(),
            })
            .unwrap();
        }
        drop(tx);
        thread.join().unwrap();
        assert_eq!(recorded.counts(), vec![(window.unix_secs(), 4, true)]);
    }

    fn with_endpoints(window_secs: u64, ids: &[i64], endpoints: &[&str]) -> Batch {
        Batch {
            window: WindowStart::from_unix_secs(window_secs),
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
            Duration::from_millis(500),
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
                    j.window_start.unix_secs(),
                    j.unique_requests,
                    j.final_count,
                )
            })
            .collect()
    }

    #[test]
    fn close_mode_calls_each_endpoint_once_per_window_with_the_final_count() {
        let (mut agg, jobs) = with_calls(CallbackTiming::Close, 10);
        agg.ingest(with_endpoints(60, &[1, 2], &["http://a/", "http://b/"]));
        agg.ingest(with_endpoints(60, &[2, 3], &["http://a/"]));
        agg.ingest(with_endpoints(120, &[1], &["http://a/"]));
        assert_eq!(calls(&jobs), vec![]);
        agg.close_due(at_ms(120_500));
        let mut got = calls(&jobs);
        got.sort();
        assert_eq!(
            got,
            vec![
                ("http://a/".into(), 60, 3, true),
                ("http://b/".into(), 60, 3, true)
            ]
        );
        agg.close_due(at_ms(180_500));
        assert_eq!(calls(&jobs), vec![("http://a/".into(), 120, 1, true)]);
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
        agg.close_due(at_ms(120_500));
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
        agg.close_due(at_ms(120_500));
        let mut got: Vec<_> = calls(&jobs).into_iter().map(|c| c.0).collect();
        got.sort();
        assert_eq!(got, vec!["http://a/", "http://b/"]);
    }
}
