//! Where the open windows' ids are inserted: in the aggregator's own thread, or
//! split by hash over owner threads, so that more than one core inserts.
//!
//! With one partition the aggregator inserts each batch itself. With `P` > 1 it
//! only routes: each id goes to the owner its hash picks, in one message per owner
//! per batch, and each owner keeps its part of every open window's set. The
//! aggregator still decides when a window closes; closing asks every owner for its
//! part. Parts are disjoint (an id's part depends on the id alone), so a window's
//! count is the sum of its parts' counts and no set is ever merged.
//!
//! Invariants: an owner handles its messages in the order sent, so the part it
//! answers a close with holds every id sent to it for that window, and the new ids
//! it reported for that window (Redis mode) came before it on the same channel.
//! Owners' queues are bounded: a slow owner holds the aggregator back, which fills
//! the workers' channel, which answers 503; nothing accepted is dropped.

use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flume::{Receiver, RecvTimeoutError, Sender};

use crate::store::{id_hasher, IdHasher, IdSet};
use crate::window::WindowStart;

/// Messages queued for one owner before the aggregator waits for it.
const OWNER_QUEUE: usize = 64;

/// How long new ids reported by owners may wait for the aggregator when no batch
/// wakes it: a worker's flush interval, by default.
const NEW_IDS_POLL: Duration = Duration::from_millis(10);

/// What the aggregator does with the ids new to this instance, when its store
/// wants them (Redis mode): called in the order the ids were inserted per window.
pub type NewIds<'a> = &'a mut dyn FnMut(WindowStart, &[i64]);

/// The open windows' ids, in one or more parts.
pub struct Partitions {
    kind: Kind,
    /// Whether to gather the ids new to this instance for the store.
    report_new: bool,
    times: Arc<BatchTimes>,
}

enum Kind {
    /// One part, in the aggregator's thread; `new_ids` is reused for each batch.
    Inline {
        windows: BTreeMap<WindowStart, IdSet>,
        new_ids: Vec<i64>,
    },
    Owners(Owners),
}

impl Partitions {
    /// `parts` partitions (1: inline, more: that many owner threads). With
    /// `report_new`, the ids new to this instance are handed to the caller's
    /// `NewIds`. Every batch's insert time goes into `times`.
    pub fn new(
        parts: usize,
        report_new: bool,
        times: Arc<BatchTimes>,
    ) -> std::io::Result<Partitions> {
        if parts <= 1 {
            return Ok(Partitions::inline(report_new, times));
        }
        Ok(Partitions {
            kind: Kind::Owners(Owners::start(parts, &times)?),
            report_new,
            times,
        })
    }

    /// Inserts `ids` into `window`, whose set is laid out for about `expected`
    /// ids if this opens it.
    pub fn insert(&mut self, window: WindowStart, ids: &[i64], expected: usize, new: NewIds) {
        let report_new = self.report_new;
        match &mut self.kind {
            Kind::Inline { windows, new_ids } => {
                let set = windows
                    .entry(window)
                    .or_insert_with(|| IdSet::with_capacity(expected));
                let started = Instant::now();
                if report_new {
                    new_ids.clear();
                    set.insert_all(ids, |id| new_ids.push(id));
                    if !new_ids.is_empty() {
                        new(window, new_ids);
                    }
                } else {
                    set.insert_all(ids, |_| {});
                }
                self.times.record(started.elapsed());
            }
            Kind::Owners(owners) => owners.route(window, ids, expected, report_new, new),
        }
    }

    /// Puts ids read back from the journal into `window`, without reporting
    /// them as new: they are in the journal already.
    pub fn restore(&mut self, window: WindowStart, ids: &[i64]) {
        match &mut self.kind {
            Kind::Inline { windows, .. } => {
                let set = windows
                    .entry(window)
                    .or_insert_with(|| IdSet::with_capacity(ids.len()));
                set.insert_all(ids, |_| {});
            }
            Kind::Owners(owners) => owners.route(window, ids, ids.len(), false, &mut |_, _| {
                unreachable!("restored ids are not reported")
            }),
        }
    }

    /// From now on, hand the ids new to this instance to the caller's `NewIds`
    /// (for the journal), whatever the store wants. Before any id is inserted.
    pub fn report_new_ids(&mut self) {
        self.report_new = true;
    }

    /// One partition, in the caller's thread.
    pub fn inline(report_new: bool, times: Arc<BatchTimes>) -> Partitions {
        Partitions {
            kind: Kind::Inline {
                windows: BTreeMap::new(),
                new_ids: Vec::new(),
            },
            report_new,
            times,
        }
    }

    /// Records batch times into `times` from now on (inline only: owners keep
    /// what they were started with, so set this first).
    pub fn time_into(&mut self, times: Arc<BatchTimes>) {
        self.times = times;
    }

    /// Ids of `window` inserted so far. With owners, as far as they have got:
    /// for callbacks with the count so far, never for a window's record.
    pub fn count_so_far(&self, window: WindowStart) -> u64 {
        match &self.kind {
            Kind::Inline { windows, .. } => windows.get(&window).map_or(0, IdSet::len),
            Kind::Owners(owners) => owners
                .counts
                .get(&window)
                .map_or(0, |count| count.load(Ordering::Relaxed)),
        }
    }

    /// Removes `window` and returns its parts, once every id sent for it is in;
    /// new ids still on their way are handed to `new` first.
    pub fn close(&mut self, window: WindowStart, new: NewIds) -> Vec<IdSet> {
        match &mut self.kind {
            Kind::Inline { windows, .. } => vec![windows.remove(&window).unwrap_or_default()],
            Kind::Owners(owners) => owners.close(window, new),
        }
    }

    /// How often the caller should look for new ids owners reported
    /// ([`Partitions::forward_new_ids`]) while nothing else wakes it: only with
    /// owners, and only when new ids are wanted.
    pub fn new_ids_pending_poll(&self) -> Option<Duration> {
        (matches!(self.kind, Kind::Owners(_)) && self.report_new).then_some(NEW_IDS_POLL)
    }

    /// Hands over the new ids owners have reported so far, without waiting.
    pub fn forward_new_ids(&mut self, new: NewIds) {
        if let Kind::Owners(owners) = &mut self.kind {
            owners.forward_new_ids(new);
        }
    }
}

/// What the aggregator asks of an owner.
enum Command {
    Insert {
        window: WindowStart,
        ids: Vec<i64>,
        expected: usize,
        count: Arc<AtomicU64>,
        /// Whether to report the ids that were new.
        report_new: bool,
    },
    Close(WindowStart),
}

/// What an owner tells the aggregator.
enum Reply {
    NewIds(WindowStart, Vec<i64>),
    Closed(WindowStart, IdSet),
}

struct Owners {
    commands: Vec<Sender<Command>>,
    replies: Receiver<Reply>,
    threads: Vec<JoinHandle<()>>,
    /// Picks an id's owner; seeded apart from the sets' own hashes.
    router: IdHasher,
    /// Per open window: its ids so far, summed by the owners as they insert.
    counts: BTreeMap<WindowStart, Arc<AtomicU64>>,
    /// Per owner, the ids of the batch being routed.
    routed: Vec<Vec<i64>>,
    /// Parts of the window being closed, as owners answer.
    closed: Vec<IdSet>,
}

impl Owners {
    fn start(parts: usize, times: &Arc<BatchTimes>) -> std::io::Result<Owners> {
        let (reply, replies) = flume::unbounded();
        let mut commands = Vec::with_capacity(parts);
        let mut threads = Vec::with_capacity(parts);
        for part in 0..parts {
            let (command, received) = flume::bounded(OWNER_QUEUE);
            let (reply, times) = (reply.clone(), times.clone());
            let thread = std::thread::Builder::new()
                .name(format!("verve-part-{part}"))
                .spawn(move || own(received, reply, &times))?;
            commands.push(command);
            threads.push(thread);
        }
        Ok(Owners {
            commands,
            replies,
            threads,
            router: id_hasher(),
            counts: BTreeMap::new(),
            routed: vec![Vec::new(); parts],
            closed: Vec::with_capacity(parts),
        })
    }

    fn part_of(&self, id: i64) -> usize {
        let h = self.router.hash_one(id);
        ((u128::from(h) * self.commands.len() as u128) >> 64) as usize
    }

    fn route(
        &mut self,
        window: WindowStart,
        ids: &[i64],
        expected: usize,
        report_new: bool,
        new: NewIds,
    ) {
        for &id in ids {
            let part = self.part_of(id);
            self.routed[part].push(id);
        }
        let count = self.counts.entry(window).or_default().clone();
        let expected = expected / self.commands.len();
        for (part, routed) in self.routed.iter_mut().enumerate() {
            if routed.is_empty() {
                continue;
            }
            let ids = std::mem::replace(routed, Vec::with_capacity(routed.capacity()));
            let insert = Command::Insert {
                window,
                ids,
                expected,
                count: count.clone(),
                report_new,
            };
            if self.commands[part].send(insert).is_err() {
                panic!("partition owner {part} is gone");
            }
        }
        self.forward_new_ids(new);
    }

    /// Hands over the new ids owners have reported so far, without waiting.
    fn forward_new_ids(&mut self, new: NewIds) {
        while let Ok(reply) = self.replies.try_recv() {
            self.handle(reply, new);
        }
    }

    fn close(&mut self, window: WindowStart, new: NewIds) -> Vec<IdSet> {
        for (part, command) in self.commands.iter().enumerate() {
            if command.send(Command::Close(window)).is_err() {
                panic!("partition owner {part} is gone");
            }
        }
        while self.closed.len() < self.commands.len() {
            match self.replies.recv_timeout(Duration::from_secs(1)) {
                Ok(Reply::Closed(closed, part)) => {
                    assert_eq!(closed, window, "owners close windows in order");
                    self.closed.push(part);
                }
                Ok(reply) => self.handle(reply, new),
                Err(RecvTimeoutError::Timeout) => {
                    if let Some(part) = self.threads.iter().position(JoinHandle::is_finished) {
                        panic!("partition owner {part} stopped");
                    }
                }
                Err(RecvTimeoutError::Disconnected) => panic!("every partition owner stopped"),
            }
        }
        self.counts.remove(&window);
        std::mem::take(&mut self.closed)
    }

    fn handle(&mut self, reply: Reply, new: NewIds) {
        match reply {
            Reply::NewIds(window, ids) => new(window, &ids),
            Reply::Closed(..) => unreachable!("a part closed only when asked"),
        }
    }
}

impl Drop for Owners {
    /// Dropping the senders ends each owner's loop; then the threads are joined.
    fn drop(&mut self) {
        self.commands.clear();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// An owner's loop: inserts into its part of each window until the aggregator
/// lets go of its queue.
fn own(commands: Receiver<Command>, replies: Sender<Reply>, times: &BatchTimes) {
    let mut windows: BTreeMap<WindowStart, IdSet> = BTreeMap::new();
    for command in commands.iter() {
        match command {
            Command::Insert {
                window,
                ids,
                expected,
                count,
                report_new,
            } => {
                let set = windows
                    .entry(window)
                    .or_insert_with(|| IdSet::with_capacity(expected));
                let started = Instant::now();
                let mut new_ids = Vec::new();
                let added = if report_new {
                    set.insert_all(&ids, |id| new_ids.push(id))
                } else {
                    set.insert_all(&ids, |_| {})
                };
                times.record(started.elapsed());
                count.fetch_add(added, Ordering::Relaxed);
                if !new_ids.is_empty() {
                    let _ = replies.send(Reply::NewIds(window, new_ids));
                }
            }
            Command::Close(window) => {
                let part = windows.remove(&window).unwrap_or_default();
                let _ = replies.send(Reply::Closed(window, part));
            }
        }
    }
}

/// How long inserting each batch took, as a histogram for `/metrics`: the
/// aggregator's lag shows here first (a table growing, an owner falling behind).
#[derive(Debug, Default)]
pub struct BatchTimes {
    /// Batches that took at most [`BatchTimes::BOUNDS`]`[i]` seconds and more
    /// than the bound before; the last counts those above every bound.
    buckets: [AtomicU64; BatchTimes::BOUNDS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
    longest_nanos: AtomicU64,
}

impl BatchTimes {
    /// Upper bounds of the buckets, in seconds.
    pub const BOUNDS: [f64; 9] = [1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 0.1, 1.0];

    pub fn record(&self, took: Duration) {
        let seconds = took.as_secs_f64();
        let bucket = Self::BOUNDS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(Self::BOUNDS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = took.as_nanos() as u64;
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        self.longest_nanos.fetch_max(nanos, Ordering::Relaxed);
    }

    /// (sum in seconds, count, (upper bound, count) per bucket), the last bucket's
    /// bound `f64::MAX` (+Inf), as prometheus-client's encoder takes them.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets = Self::BOUNDS
            .iter()
            .chain(&[f64::MAX])
            .zip(&self.buckets)
            .map(|(&bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        (sum, self.count.load(Ordering::Relaxed), buckets)
    }

    /// The longest batch since start, in seconds.
    pub fn longest(&self) -> f64 {
        self.longest_nanos.load(Ordering::Relaxed) as f64 / 1e9
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn window(secs: u64) -> WindowStart {
        WindowStart::from_unix_secs(secs)
    }

    /// Inserts `batches` into `window` and returns the reported new ids and the
    /// closed parts.
    fn run(parts: usize, batches: &[Vec<i64>]) -> (Vec<i64>, Vec<IdSet>) {
        let mut partitions = Partitions::new(parts, true, Arc::default()).unwrap();
        let mut reported = Vec::new();
        let mut new = |w: WindowStart, ids: &[i64]| {
            assert_eq!(w, window(60));
            reported.extend_from_slice(ids);
        };
        for batch in batches {
            partitions.insert(window(60), batch, 0, &mut new);
        }
        let closed = partitions.close(window(60), &mut new);
        (reported, closed)
    }

    #[test]
    fn parts_are_disjoint_and_count_every_distinct_id_once() {
        let batches: Vec<Vec<i64>> = (0..40)
            .map(|b| (0..512).map(|i| (b * 300 + i) % 9_001 - 4_500).collect())
            .collect();
        let distinct: HashSet<i64> = batches.iter().flatten().copied().collect();
        for parts in [1, 2, 3, 8] {
            let (reported, closed) = run(parts, &batches);
            assert_eq!(closed.len(), parts);
            assert_eq!(
                closed.iter().map(IdSet::len).sum::<u64>(),
                distinct.len() as u64
            );
            let mut seen = HashSet::new();
            for part in &closed {
                part.for_each(|id| assert!(seen.insert(id), "{id} in two parts"));
            }
            assert_eq!(seen, distinct);
            let reported_set: HashSet<i64> = reported.iter().copied().collect();
            assert_eq!(reported.len(), distinct.len(), "each new id reported once");
            assert_eq!(reported_set, distinct);
            if parts > 1 {
                assert!(
                    closed.iter().all(|part| !part.is_empty()),
                    "ids spread over every part"
                );
            }
        }
    }

    #[test]
    fn windows_are_kept_apart_and_the_count_so_far_follows_the_owners() {
        let mut partitions = Partitions::new(4, false, Arc::default()).unwrap();
        let mut none = |_: WindowStart, _: &[i64]| unreachable!("no new ids asked for");
        partitions.insert(window(60), &[1, 2, 3, 3], 0, &mut none);
        partitions.insert(window(120), &[3, 4], 0, &mut none);
        let first = partitions.close(window(60), &mut none);
        assert_eq!(first.iter().map(IdSet::len).sum::<u64>(), 3);
        // Closing waited for window 120's inserts too, which came before.
        assert_eq!(partitions.count_so_far(window(120)), 2);
        let second = partitions.close(window(120), &mut none);
        assert_eq!(second.iter().map(IdSet::len).sum::<u64>(), 2);
        assert_eq!(
            partitions.count_so_far(window(120)),
            0,
            "forgotten once closed"
        );
    }

    #[test]
    fn batch_times_fall_in_their_buckets() {
        let times = BatchTimes::default();
        times.record(Duration::from_micros(7));
        times.record(Duration::from_micros(700));
        times.record(Duration::from_secs(3));
        let (sum, count, buckets) = times.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 3.000707).abs() < 1e-9);
        assert_eq!(buckets[0], (1e-5, 1));
        assert_eq!(buckets[4], (1e-3, 1));
        assert_eq!(buckets[8], (1.0, 0));
        assert_eq!(buckets[9], (f64::MAX, 1), "3 s is above every bound");
        assert_eq!(times.longest(), 3.0);
    }
}
