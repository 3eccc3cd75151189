//! Per-worker batching of accepted ids on their way to the aggregator, and the
//! watermarks that tell the aggregator when a window may close.
//!
//! A worker appends each accepted id to its [`Batcher`]; full batches go over the
//! bounded channel to the aggregator, one send per batch rather than per id. A batch
//! holds ids of one window only, so a batch is sealed as soon as a request falls in
//! the next window.
//!
//! On every flush tick, once everything the worker has stamped is in the channel, it
//! also sends a [`Watermark`]: the promise that it will never send an id of a window
//! before the current one again. It keeps the promise by never stamping an id with a
//! window before its watermark (a wall clock that steps back counts ids in the
//! watermark's window). The channel is first in, first out for each sender, so when
//! the aggregator reads a worker's watermark, every id that worker stamped with an
//! earlier window has already arrived: a window closes once every worker's
//! watermark is past it, and no id answered `ok` can reach a closed window.
//!
//! Invariant: once [`Batcher::push`] has returned `Ok`, the id reaches the aggregator
//! (if the process is not killed). When the channel is full, the sealed batch (or
//! watermark) is kept aside as `stalled` and nothing more is accepted until it has
//! gone; callers answer 503 for the refused ids, and no accepted id is ever dropped.

use std::sync::Arc;

use flume::{Sender, TrySendError};

use crate::admission::Admission;
use crate::window::WindowStart;

/// Distinct endpoints one batch may carry. A batch is sealed early when one more
/// would not fit, which bounds the memory an endpoint-heavy load can queue up.
pub const MAX_BATCH_ENDPOINTS: usize = 16;

/// What a worker sends the aggregator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handoff {
    Ids(Batch),
    Watermark(Watermark),
}

/// Ids accepted by one worker in one window, and the endpoints their requests named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub window: WindowStart,
    pub ids: Vec<i64>,
    /// Distinct within the batch; the aggregator dedups across batches.
    pub endpoints: Vec<Arc<str>>,
}

/// Worker `worker` has handed over every id it stamped with a window before
/// `window`, and will stamp none with such a window again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Watermark {
    pub worker: usize,
    pub window: WindowStart,
}

/// The channel to the aggregator is full, the aggregator is gone, or the store has
/// closed admission: refuse the id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overloaded;

/// One worker's batch in progress, its watermark, and the channel they drain into.
pub struct Batcher {
    /// `None` once [`Batcher::finish`] has let go of the channel.
    tx: Option<Sender<Handoff>>,
    /// Closed by a store that cannot take more ids (Redis down, buffer full).
    admission: Admission,
    worker: usize,
    current: Batch,
    /// A sealed batch or a watermark the channel had no room for; sent before anything else.
    stalled: Option<Handoff>,
    capacity: usize,
    /// No id is stamped with an earlier window; every id of an earlier one has been sent.
    watermark: WindowStart,
}

impl Batcher {
    /// Worker `worker`'s batcher, sealing a batch at `capacity` ids. `first` is the
    /// window the service started in: nothing is stamped before it.
    pub fn new(
        tx: Sender<Handoff>,
        capacity: usize,
        admission: Admission,
        worker: usize,
        first: WindowStart,
    ) -> Self {
        Batcher {
            tx: Some(tx),
            admission,
            worker,
            current: Batch {
                window: first,
                ids: Vec::with_capacity(capacity),
                endpoints: Vec::new(),
            },
            stalled: None,
            capacity,
            watermark: first,
        }
    }

    /// Accepts `id` (and the endpoint its request named) into `window`, or refuses
    /// it when the aggregator cannot keep up. A window this worker has already
    /// passed (the clock stepped back) counts the id in the watermark's window.
    #[inline]
    pub fn push(
        &mut self,
        window: WindowStart,
        id: i64,
        endpoint: Option<&str>,
    ) -> Result<(), Overloaded> {
        if self.tx.is_none()
            || !self.admission.is_open()
            || (self.stalled.is_some() && !self.retry_stalled())
        {
            return Err(Overloaded);
        }
        let window = window.max(self.watermark);
        let new_endpoint =
            endpoint.filter(|e| !self.current.endpoints.iter().any(|known| **known == **e));
        let fits = window == self.current.window
            && (new_endpoint.is_none() || self.current.endpoints.len() < MAX_BATCH_ENDPOINTS);
        if !fits {
            if !self.current.ids.is_empty() {
                self.seal();
                if self.stalled.is_some() {
                    return Err(Overloaded);
                }
            }
            self.current.window = window;
        }
        if let Some(endpoint) = new_endpoint {
            self.current.endpoints.push(Arc::from(endpoint));
        }
        self.current.ids.push(id);
        if self.current.ids.len() >= self.capacity {
            self.seal();
        }
        Ok(())
    }

    /// Sends whatever is batched so far and, once all of it is in the channel,
    /// moves the watermark up to `now` (the window of the current time) and tells
    /// the aggregator. Called every flush interval.
    pub fn flush(&mut self, now: WindowStart) {
        if self.stalled.is_some() && !self.retry_stalled() {
            return;
        }
        if !self.current.ids.is_empty() {
            self.seal();
            if self.stalled.is_some() {
                return;
            }
        }
        if now > self.watermark {
            self.watermark = now;
            self.send(Handoff::Watermark(Watermark {
                worker: self.worker,
                window: now,
            }));
        }
    }

    /// Sends everything, waiting for room in the channel, then lets go of the
    /// channel so the aggregator can see that this worker is done. Ids pushed later
    /// are refused. For shutdown: it blocks the calling thread.
    pub fn finish(&mut self) {
        let Some(tx) = self.tx.take() else {
            return;
        };
        let current = Batch {
            window: self.current.window,
            ids: std::mem::take(&mut self.current.ids),
            endpoints: std::mem::take(&mut self.current.endpoints),
        };
        let current = (!current.ids.is_empty()).then_some(Handoff::Ids(current));
        for handoff in self.stalled.take().into_iter().chain(current) {
            if let Err(err) = tx.send(handoff) {
                if let Handoff::Ids(batch) = err.0 {
                    tracing::error!(
                        ids = batch.ids.len(),
                        "aggregator gone; ids lost at shutdown"
                    );
                }
            }
        }
    }

    /// Ids waiting in this batcher, sealed or not.
    #[cfg(test)]
    fn pending_ids(&self) -> usize {
        let stalled = match &self.stalled {
            Some(Handoff::Ids(batch)) => batch.ids.len(),
            _ => 0,
        };
        self.current.ids.len() + stalled
    }

    /// Hands the current batch to the channel; keeps it aside if there is no room.
    fn seal(&mut self) {
        let batch = Batch {
            window: self.current.window,
            ids: std::mem::replace(&mut self.current.ids, Vec::with_capacity(self.capacity)),
            endpoints: std::mem::take(&mut self.current.endpoints),
        };
        self.send(Handoff::Ids(batch));
    }

    /// Hands `handoff` to the channel, or keeps it as `stalled` when there is no room.
    fn send(&mut self, handoff: Handoff) {
        debug_assert!(self.stalled.is_none());
        if let Err(handoff) = self.try_send(handoff) {
            self.stalled = Some(handoff);
        }
    }

    /// Tries the stalled handoff again; true once it has gone.
    fn retry_stalled(&mut self) -> bool {
        let Some(handoff) = self.stalled.take() else {
            return true;
        };
        self.send(handoff);
        self.stalled.is_none()
    }

    /// Hands `handoff` to the channel, or back when there is no room (or no channel).
    fn try_send(&self, handoff: Handoff) -> Result<(), Handoff> {
        let Some(tx) = &self.tx else {
            return Err(handoff);
        };
        tx.try_send(handoff).map_err(|err| match err {
            TrySendError::Full(handoff) | TrySendError::Disconnected(handoff) => handoff,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W0: WindowStart = WindowStart::from_unix_secs(60);
    const W1: WindowStart = WindowStart::from_unix_secs(120);
    const W2: WindowStart = WindowStart::from_unix_secs(180);

    fn batcher(tx: Sender<Handoff>, capacity: usize) -> Batcher {
        Batcher::new(tx, capacity, Admission::default(), 3, W0)
    }

    fn ids(handoff: Handoff) -> Vec<i64> {
        match handoff {
            Handoff::Ids(batch) => batch.ids,
            Handoff::Watermark(mark) => panic!("expected ids, got {mark:?}"),
        }
    }

    fn batch(window: WindowStart, ids: &[i64]) -> Handoff {
        Handoff::Ids(Batch {
            window,
            ids: ids.to_vec(),
            endpoints: Vec::new(),
        })
    }

    fn watermark(window: WindowStart) -> Handoff {
        Handoff::Watermark(Watermark { worker: 3, window })
    }

    #[test]
    fn endpoints_travel_once_per_batch() {
        let (tx, rx) = flume::bounded(8);
        let mut batcher = batcher(tx, 100);
        batcher.push(W0, 1, Some("http://a/")).unwrap();
        batcher.push(W0, 2, Some("http://a/")).unwrap();
        batcher.push(W0, 3, None).unwrap();
        batcher.push(W0, 4, Some("http://b/")).unwrap();
        batcher.flush(W0);
        let Handoff::Ids(sent) = rx.try_recv().unwrap() else {
            panic!("expected a batch")
        };
        assert_eq!(sent.ids, vec![1, 2, 3, 4]);
        assert_eq!(
            sent.endpoints,
            vec![Arc::from("http://a/"), Arc::from("http://b/")]
        );
    }

    #[test]
    fn too_many_endpoints_seal_the_batch() {
        let (tx, rx) = flume::bounded(8);
        let mut batcher = batcher(tx, 1000);
        let endpoints: Vec<String> = (0..=MAX_BATCH_ENDPOINTS)
            .map(|i| format!("http://h{i}/"))
            .collect();
        for (id, endpoint) in endpoints.iter().enumerate() {
            batcher.push(W0, id as i64, Some(endpoint)).unwrap();
        }
        let Handoff::Ids(first) = rx.try_recv().unwrap() else {
            panic!("expected a batch")
        };
        assert_eq!(
            (first.ids.len(), first.endpoints.len()),
            (MAX_BATCH_ENDPOINTS, MAX_BATCH_ENDPOINTS)
        );
        batcher.flush(W0);
        let Handoff::Ids(second) = rx.try_recv().unwrap() else {
            panic!("expected a batch")
        };
        assert_eq!(
            second.endpoints,
            vec![Arc::from(endpoints[MAX_BATCH_ENDPOINTS].as_str())]
        );
    }

    #[test]
    fn batches_seal_when_full() {
        let (tx, rx) = flume::bounded(8);
        let mut batcher = batcher(tx, 3);
        for id in 1..=7 {
            batcher.push(W0, id, None).unwrap();
        }
        assert_eq!(ids(rx.try_recv().unwrap()), vec![1, 2, 3]);
        assert_eq!(ids(rx.try_recv().unwrap()), vec![4, 5, 6]);
        assert!(rx.try_recv().is_err());
        batcher.flush(W0);
        assert_eq!(rx.drain().collect::<Vec<_>>(), vec![batch(W0, &[7])]);
    }

    #[test]
    fn a_new_window_seals_the_old_batch_and_the_next_flush_passes_it() {
        let (tx, rx) = flume::bounded(8);
        let mut batcher = batcher(tx, 100);
        batcher.push(W0, 1, None).unwrap();
        batcher.push(W1, 1, None).unwrap();
        assert_eq!(rx.try_recv().unwrap(), batch(W0, &[1]));
        batcher.flush(W1);
        assert_eq!(
            rx.drain().collect::<Vec<_>>(),
            vec![batch(W1, &[1]), watermark(W1)]
        );
        // Nothing new: a flush in the same window sends nothing.
        batcher.flush(W1);
        assert!(rx.is_empty());
    }

    #[test]
    fn an_idle_worker_still_passes_windows() {
        let (tx, rx) = flume::bounded(8);
        let mut batcher = batcher(tx, 100);
        batcher.flush(W0);
        assert!(rx.is_empty());
        batcher.flush(W2);
        assert_eq!(rx.drain().collect::<Vec<_>>(), vec![watermark(W2)]);
    }

    #[test]
    fn a_clock_stepping_back_counts_in_the_watermark_window() {
        let (tx, rx) = flume::bounded(8);
        let mut batcher = batcher(tx, 100);
        batcher.flush(W1);
        batcher.push(W0, 5, None).unwrap();
        batcher.flush(W0);
        assert_eq!(
            rx.drain().collect::<Vec<_>>(),
            vec![watermark(W1), batch(W1, &[5])]
        );
    }

    #[test]
    fn a_watermark_waits_behind_a_stalled_batch() {
        let (tx, rx) = flume::bounded(1);
        let mut batcher = batcher(tx, 1);
        batcher.push(W0, 1, None).unwrap(); // sealed, fills the channel
        batcher.push(W0, 2, None).unwrap(); // sealed, stalled
        batcher.flush(W1);
        assert_eq!(rx.try_recv().unwrap(), batch(W0, &[1]));
        // Only once the stalled batch is in does the watermark follow it.
        batcher.flush(W1);
        assert_eq!(rx.try_recv().unwrap(), batch(W0, &[2]));
        batcher.flush(W1);
        assert_eq!(rx.try_recv().unwrap(), watermark(W1));
    }

    #[test]
    fn a_full_channel_refuses_new_ids_and_keeps_accepted_ones() {
        let (tx, rx) = flume::bounded(1);
        let mut batcher = batcher(tx, 2);
        batcher.push(W0, 1, None).unwrap();
        batcher.push(W0, 2, None).unwrap(); // sealed, fills the channel
        batcher.push(W0, 3, None).unwrap();
        batcher.push(W0, 4, None).unwrap(); // sealed, stalled
        assert_eq!(batcher.push(W0, 5, None), Err(Overloaded));
        assert_eq!(batcher.pending_ids(), 2);

        assert_eq!(ids(rx.try_recv().unwrap()), vec![1, 2]);
        batcher.push(W0, 6, None).unwrap(); // the stalled batch goes first
        assert_eq!(ids(rx.try_recv().unwrap()), vec![3, 4]);
        batcher.flush(W0);
        assert_eq!(ids(rx.try_recv().unwrap()), vec![6]);
    }

    #[test]
    fn closed_admission_refuses_new_ids_only() {
        let (tx, rx) = flume::bounded(8);
        let admission = Admission::default();
        let mut batcher = Batcher::new(tx, 100, admission.clone(), 0, W0);
        batcher.push(W0, 1, None).unwrap();
        admission.set_open(false);
        assert_eq!(batcher.push(W0, 2, None), Err(Overloaded));
        admission.set_open(true);
        batcher.push(W0, 3, None).unwrap();
        batcher.flush(W0);
        assert_eq!(ids(rx.try_recv().unwrap()), vec![1, 3]);
    }

    #[test]
    fn finish_sends_stalled_and_current_then_lets_go() {
        let (tx, rx) = flume::bounded(1);
        let mut batcher = batcher(tx, 1);
        batcher.push(W0, 1, None).unwrap();
        batcher.push(W0, 2, None).unwrap(); // stalled
        let drain = std::thread::spawn(move || rx.iter().map(ids).collect::<Vec<_>>());
        batcher.finish();
        // The batcher still exists, but the channel is already disconnected.
        assert_eq!(drain.join().unwrap(), vec![vec![1], vec![2]]);
        assert_eq!(batcher.push(W0, 3, None), Err(Overloaded));
    }
}
