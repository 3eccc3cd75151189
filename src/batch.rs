//! Per-worker batching of accepted ids on their way to the aggregator.
//!
//! A worker appends each accepted id to its [`Batcher`]; full batches go over the
//! bounded channel to the aggregator, one send per batch rather than per id. A batch
//! holds ids of one window only, so a batch is sealed as soon as a request falls in
//! the next window.
//!
//! Invariant: once [`Batcher::push`] has returned `Ok`, the id reaches the aggregator
//! (if the process is not killed). When the channel is full, the sealed batch is kept
//! aside as `stalled` and nothing more is accepted until it has gone; callers answer
//! 503 for the refused ids, and no accepted id is ever dropped.

use std::sync::Arc;

use flume::{Sender, TrySendError};

use crate::store::Admission;
use crate::window::WindowStart;

/// Distinct endpoints one batch may carry. A batch is sealed early when one more
/// would not fit, which bounds the memory an endpoint-heavy load can queue up.
pub const MAX_BATCH_ENDPOINTS: usize = 16;

/// Ids accepted by one worker in one window, and the endpoints their requests named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub window: WindowStart,
    pub ids: Vec<i64>,
    /// Distinct within the batch; the aggregator dedups across batches.
    pub endpoints: Vec<Arc<str>>,
}

/// The channel to the aggregator is full, the aggregator is gone, or the store has
/// closed admission: refuse the id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overloaded;

/// One worker's batch in progress, and the channel it drains into.
pub struct Batcher {
    /// `None` once [`Batcher::finish`] has let go of the channel.
    tx: Option<Sender<Batch>>,
    /// Closed by a store that cannot take more ids (Redis down, buffer full).
    admission: Admission,
    current: Batch,
    stalled: Option<Batch>,
    capacity: usize,
}

impl Batcher {
    /// A batcher that seals a batch at `capacity` ids.
    pub fn new(tx: Sender<Batch>, capacity: usize, admission: Admission) -> Self {
        Batcher {
            tx: Some(tx),
            admission,
            current: Batch {
                window: WindowStart::from_unix_secs(0),
                ids: Vec::with_capacity(capacity),
                endpoints: Vec::new(),
            },
            stalled: None,
            capacity,
        }
    }

    /// Accepts `id` (and the endpoint its request named) into `window`, or refuses
    /// it when the aggregator cannot keep up.
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

    /// Whether [`Batcher::finish`] has run.
    pub fn is_finished(&self) -> bool {
        self.tx.is_none()
    }

    /// Sends whatever is batched so far; called every flush interval.
    pub fn flush(&mut self) {
        if self.stalled.is_some() && !self.retry_stalled() {
            return;
        }
        if !self.current.ids.is_empty() {
            self.seal();
        }
    }

    /// Sends everything, waiting for room in the channel, then lets go of the
    /// channel so the aggregator can see that this worker is done. Ids pushed later
    /// are refused. For shutdown: it blocks the calling thread.
    pub fn finish(&mut self) {
        let Some(tx) = self.tx.take() else {
            return;
        };
        let pending = self.stalled.take().into_iter();
        let current = Batch {
            window: self.current.window,
            ids: std::mem::take(&mut self.current.ids),
            endpoints: std::mem::take(&mut self.current.endpoints),
        };
        let batches = pending.chain((!current.ids.is_empty()).then_some(current));
        for batch in batches {
            if let Err(err) = tx.send(batch) {
                tracing::error!(
                    ids = err.0.ids.len(),
                    "aggregator gone; ids lost at shutdown"
                );
            }
        }
    }

    /// Ids waiting in this batcher, sealed or not.
    pub fn pending_ids(&self) -> usize {
        self.current.ids.len() + self.stalled.as_ref().map_or(0, |b| b.ids.len())
    }

    /// Hands the current batch to the channel; keeps it aside if there is no room.
    fn seal(&mut self) {
        debug_assert!(self.stalled.is_none());
        let batch = Batch {
            window: self.current.window,
            ids: std::mem::replace(&mut self.current.ids, Vec::with_capacity(self.capacity)),
            endpoints: std::mem::take(&mut self.current.endpoints),
        };
        if let Err(batch) = self.try_send(batch) {
            self.stalled = Some(batch);
        }
    }

    /// Tries the stalled batch again; true once it has gone.
    fn retry_stalled(&mut self) -> bool {
        let Some(batch) = self.stalled.take() else {
            return true;
        };
        match self.try_send(batch) {
            Ok(()) => true,
            Err(batch) => {
                self.stalled = Some(batch);
                false
            }
        }
    }

    /// Hands `batch` to the channel, or back when there is no room (or no channel).
    fn try_send(&self, batch: Batch) -> Result<(), Batch> {
        let Some(tx) = &self.tx else {
            return Err(batch);
        };
        tx.try_send(batch).map_err(|err| match err {
            TrySendError::Full(batch) | TrySendError::Disconnected(batch) => batch,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W0: WindowStart = WindowStart::from_unix_secs(60);
    const W1: WindowStart = WindowStart::from_unix_secs(120);

    fn batch(window: WindowStart, ids: &[i64]) -> Batch {
        Batch {
            window,
            ids: ids.to_vec(),
            endpoints: Vec::new(),
        }
    }

    #[test]
    fn endpoints_travel_once_per_batch() {
        let (tx, rx) = flume::bounded(8);
        let mut batcher = Batcher::new(tx, 100, Admission::default());
        batcher.push(W0, 1, Some("http://a/")).unwrap();
        batcher.push(W0, 2, Some("http://a/")).unwrap();
        batcher.push(W0, 3, None).unwrap();
        batcher.push(W0, 4, Some("http://b/")).unwrap();
        batcher.flush();
        let sent = rx.try_recv().unwrap();
        assert_eq!(sent.ids, vec![1, 2, 3, 4]);
        assert_eq!(
            sent.endpoints,
            vec![Arc::from("http://a/"), Arc::from("http://b/")]
        );
    }

    #[test]
    fn too_many_endpoints_seal_the_batch() {
        let (tx, rx) = flume::bounded(8);
        let mut batcher = Batcher::new(tx, 1000, Admission::default());
        let endpoints: Vec<String> = (0..=MAX_BATCH_ENDPOINTS)
            .map(|i| format!("http://h{i}/"))
            .collect();
        for (id, endpoint) in endpoints.iter().enumerate() {
            batcher.push(W0, id as i64, Some(endpoint)).unwrap();
        }
        let first = rx.try_recv().unwrap();
        assert_eq!(
            (first.ids.len(), first.endpoints.len()),
            (MAX_BATCH_ENDPOINTS, MAX_BATCH_ENDPOINTS)
        );
        batcher.flush();
        let second = rx.try_recv().unwrap();
        assert_eq!(
            second.endpoints,
            vec![Arc::from(endpoints[MAX_BATCH_ENDPOINTS].as_str())]
        );
    }

    #[test]
    fn batches_seal_when_full() {
        let (tx, rx) = flume::bounded(8);
        let mut batcher = Batcher::new(tx, 3, Admission::default());
        for id in 1..=7 {
            batcher.push(W0, id, None).unwrap();
        }
        assert_eq!(rx.try_recv().unwrap().ids, vec![1, 2, 3]);
        assert_eq!(rx.try_recv().unwrap().ids, vec![4, 5, 6]);
        assert!(rx.try_recv().is_err());
        batcher.flush();
        assert_eq!(rx.try_recv().unwrap(), batch(W0, &[7]));
    }

    #[test]
    fn a_new_window_seals_the_old_batch() {
        let (tx, rx) = flume::bounded(8);
        let mut batcher = Batcher::new(tx, 100, Admission::default());
        batcher.push(W0, 1, None).unwrap();
        batcher.push(W1, 1, None).unwrap();
        assert_eq!(rx.try_recv().unwrap(), batch(W0, &[1]));
        batcher.flush();
        assert_eq!(rx.try_recv().unwrap(), batch(W1, &[1]));
    }

    #[test]
    fn a_full_channel_refuses_new_ids_and_keeps_accepted_ones() {
        let (tx, rx) = flume::bounded(1);
        let mut batcher = Batcher::new(tx, 2, Admission::default());
        batcher.push(W0, 1, None).unwrap();
        batcher.push(W0, 2, None).unwrap(); // sealed, fills the channel
        batcher.push(W0, 3, None).unwrap();
        batcher.push(W0, 4, None).unwrap(); // sealed, stalled
        assert_eq!(batcher.push(W0, 5, None), Err(Overloaded));
        assert_eq!(batcher.pending_ids(), 2);

        assert_eq!(rx.try_recv().unwrap().ids, vec![1, 2]);
        batcher.push(W0, 6, None).unwrap(); // the stalled batch goes first
        assert_eq!(rx.try_recv().unwrap().ids, vec![3, 4]);
        batcher.flush();
        assert_eq!(rx.try_recv().unwrap().ids, vec![6]);
    }

    #[test]
    fn closed_admission_refuses_new_ids_only() {
        let (tx, rx) = flume::bounded(8);
        let admission = Admission::default();
        let mut batcher = Batcher::new(tx, 100, admission.clone());
        batcher.push(W0, 1, None).unwrap();
        admission.set_open(false);
        assert_eq!(batcher.push(W0, 2, None), Err(Overloaded));
        admission.set_open(true);
        batcher.push(W0, 3, None).unwrap();
        batcher.flush();
        assert_eq!(rx.try_recv().unwrap().ids, vec![1, 3]);
    }

    #[test]
    fn finish_sends_stalled_and_current_then_lets_go() {
        let (tx, rx) = flume::bounded(1);
        let mut batcher = Batcher::new(tx, 1, Admission::default());
        batcher.push(W0, 1, None).unwrap();
        batcher.push(W0, 2, None).unwrap(); // stalled
        let drain = std::thread::spawn(move || rx.iter().map(|b| b.ids).collect::<Vec<_>>());
        batcher.finish();
        // The batcher still exists, but the channel is already disconnected.
        assert_eq!(drain.join().unwrap(), vec![vec![1], vec![2]]);
        assert_eq!(batcher.push(W0, 3, None), Err(Overloaded));
    }
}
