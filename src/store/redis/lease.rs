//! This run's lease on `ok`: in Redis mode an instance answers `ok` only while the
//! fleet still counts it as live, so that no window the fleet publishes as
//! `complete=true` without it can hold an id it answered.
//!
//! The fleet stops waiting for a run on the windows that begin after its
//! heartbeat expired (by Redis's clock, `VERVE_FLEET_WAIT_MS` after Redis ran the
//! last one). Redis ran it after this run sent it, so a lease ending a term
//! ([`super::rules::lease_term`]) after the send ends before that expiry, by a margin
//! that covers the clock offset the fleet tolerates. A run whose link stalls past
//! its lease answers 503 until a heartbeat is answered again; its ids accepted
//! before then belong to windows that began while it was still live, which the
//! fleet does not publish complete without it.
//!
//! A thread of its own watches the term, because the forwarder may be stuck in a
//! Redis call when it ends. It is the only writer of [`Closed::Lapsed`]; the
//! forwarder only moves the deadline on.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use super::RedisGauges;
use crate::admission::{Admission, Closed};

/// The lease and its watching thread; dropping it ends the thread.
pub(super) struct Lease {
    shared: Arc<Shared>,
    watcher: Option<JoinHandle<()>>,
}

/// A handle the forwarder renews the lease with.
#[derive(Clone)]
pub(super) struct Renewal {
    shared: Arc<Shared>,
    watcher: Thread,
}

struct Shared {
    /// What the deadline is measured from.
    origin: Instant,
    /// The lease's end, in ns after `origin`; 0 until the first answered heartbeat.
    deadline_ns: AtomicU64,
    term: Duration,
    stopped: AtomicBool,
}

impl Lease {
    /// Starts the watcher, with the lease already over: `ok` waits for the first
    /// answered heartbeat (as the fleet's admission already does).
    pub fn start(
        admission: Admission,
        gauges: Arc<RedisGauges>,
        term: Duration,
    ) -> std::io::Result<(Lease, Renewal)> {
        let shared = Arc::new(Shared {
            origin: Instant::now(),
            deadline_ns: AtomicU64::new(0),
            term,
            stopped: AtomicBool::new(false),
        });
        let watcher = std::thread::Builder::new()
            .name("verve-lease".into())
            .spawn({
                let shared = shared.clone();
                move || watch(&shared, &admission, &gauges)
            })?;
        let renewal = Renewal {
            shared: shared.clone(),
            watcher: watcher.thread().clone(),
        };
        let lease = Lease {
            shared,
            watcher: Some(watcher),
        };
        Ok((lease, renewal))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::Relaxed);
        if let Some(watcher) = self.watcher.take() {
            watcher.thread().unpark();
            let _ = watcher.join();
        }
    }
}

impl Renewal {
    /// A heartbeat sent at `sent` was answered: the lease runs a term from then.
    pub fn renew(&self, sent: Instant) {
        let deadline = sent + self.shared.term;
        let ns = deadline.duration_since(self.shared.origin).as_nanos() as u64;
        self.shared.deadline_ns.fetch_max(ns, Ordering::Relaxed);
        self.watcher.unpark();
    }
}

/// Closes admission while the lease is over, opens it while it runs, and sleeps
/// until the deadline (or until a renewal wakes it).
fn watch(shared: &Shared, admission: &Admission, gauges: &RedisGauges) {
    let (mut lapsed, mut warned) = (None, false);
    while !shared.stopped.load(Ordering::Relaxed) {
        let ns = shared.deadline_ns.load(Ordering::Relaxed);
        let deadline = shared.origin + Duration::from_nanos(ns);
        let now = Instant::now();
        let over = now >= deadline;
        if lapsed != Some(over) {
            admission.set(Closed::Lapsed, over);
            gauges
                .lease_lapsed
                .store(u64::from(over), Ordering::Relaxed);
            if over && lapsed.is_some() {
                tracing::warn!(
                    term_ms = shared.term.as_millis() as u64,
                    "no heartbeat answered by Redis within this instance's lease: new ids get 503 until one is, as the fleet no longer waits for this instance"
                );
                warned = true;
            } else if !over && warned {
                tracing::info!("Redis answered a heartbeat again: accepting ids");
                warned = false;
            }
            lapsed = Some(over);
        }
        match over {
            true => std::thread::park(),
            false => std::thread::park_timeout(deadline - now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn until(condition: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !condition() {
            assert!(Instant::now() < deadline, "condition never held");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn admission_opens_at_a_renewal_and_closes_a_term_after_the_heartbeat_was_sent() {
        let admission = Admission::default();
        let term = Duration::from_millis(200);
        let (_lease, renewal) = Lease::start(admission.clone(), Arc::default(), term).unwrap();
        until(|| admission.is_closed_for(Closed::Lapsed));
        let sent = Instant::now();
        renewal.renew(sent);
        until(|| admission.is_open());
        until(|| admission.is_closed_for(Closed::Lapsed));
        assert!(sent.elapsed() >= term, "closed before the term was over");
    }

    #[test]
    fn a_renewal_from_an_older_heartbeat_never_shortens_the_lease() {
        let admission = Admission::default();
        let (_lease, renewal) =
            Lease::start(admission.clone(), Arc::default(), Duration::from_secs(60)).unwrap();
        let older = Instant::now();
        renewal.renew(older + Duration::from_secs(1));
        renewal.renew(older);
        until(|| admission.is_open());
        let ns = renewal.shared.deadline_ns.load(Ordering::Relaxed);
        let deadline = renewal.shared.origin + Duration::from_nanos(ns);
        assert_eq!(deadline, older + Duration::from_secs(61));
    }
}
