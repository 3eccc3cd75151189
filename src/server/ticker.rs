//! The workers' clock: one thread for the whole server that wakes every worker on
//! a fixed period, so that the workers' runtimes need no timer driver. Monoio's
//! timer driver reads the clock and walks its wheel every time a worker parks,
//! which with one request per read is on every request; a tick costs a worker one
//! wake-up per period instead.
//!
//! Each worker has its own channel of one tick, sent with `try_send`: a worker that
//! has not taken its last tick is not sent another, and the ticker never waits for
//! a worker. A tick carries the instant it was due, on a grid of whole periods from
//! the ticker's start, so a worker times its jobs ([`Every`]) by the grid and not
//! by when this thread happened to wake or the worker happened to run.
//!
//! Invariant: the ticker outlives the workers. They flush and drain on its ticks
//! until their last moment, so it ends only once every worker has dropped its
//! receiver; [`Ticker::stop`] then wakes it to notice at once.

use std::io;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The ticker thread.
pub(crate) struct Ticker {
    thread: JoinHandle<()>,
}

impl Ticker {
    /// Starts the thread, ticking every `period` for `workers` workers; returns it
    /// with each worker's receiver of ticks.
    pub(crate) fn start(
        period: Duration,
        workers: usize,
    ) -> io::Result<(Ticker, Vec<flume::Receiver<Instant>>)> {
        let (senders, receivers) = (0..workers).map(|_| flume::bounded(1)).unzip();
        let thread = std::thread::Builder::new()
            .name("verve-ticker".into())
            .spawn(move || run(period, senders))?;
        Ok((Ticker { thread }, receivers))
    }

    /// Waits for the thread to end, which it does once every worker's receiver is
    /// gone: call it after the workers have stopped.
    pub(crate) fn stop(self) {
        self.thread.thread().unpark();
        if self.thread.join().is_err() {
            tracing::error!("the ticker thread panicked");
        }
    }
}

fn run(period: Duration, workers: Vec<flume::Sender<Instant>>) {
    let mut due = Instant::now() + period;
    while workers.iter().any(|worker| !worker.is_disconnected()) {
        let now = Instant::now();
        if now < due {
            // Woken early (by `Ticker::stop`, or spuriously), the loop looks again.
            std::thread::park_timeout(due - now);
            continue;
        }
        for worker in &workers {
            // Full means the worker has yet to take its last tick: one is enough.
            let _ = worker.try_send(due);
        }
        due = next_due(due, period, now);
    }
}

/// When something due every `period`, last due at `due` and done at `now`, is due
/// next: the next time on its grid, or one period from now if it fell behind, so
/// that what was missed does not come in a burst (the ticker's ticks, a worker's
/// jobs).
fn next_due(due: Instant, period: Duration, now: Instant) -> Instant {
    let next = due + period;
    if next > now {
        next
    } else {
        now + period
    }
}

/// A job a worker runs every `interval`, on the first tick at or after each time
/// it is due.
///
/// It is next due one interval after it was last due, not after the tick that ran
/// it, so over many ticks it keeps its interval even when that is not a whole
/// number of ticks; a worker held up for longer than an interval runs it once,
/// not once per interval missed.
#[derive(Debug)]
pub(crate) struct Every {
    interval: Duration,
    due: Instant,
}

impl Every {
    /// First due one interval after `start`.
    pub(crate) fn new(interval: Duration, start: Instant) -> Every {
        Every {
            interval,
            due: start + interval,
        }
    }

    /// Whether the job runs on the tick due at `tick`.
    pub(crate) fn due(&mut self, tick: Instant) -> bool {
        if tick < self.due {
            return false;
        }
        self.due = next_due(self.due, self.interval, tick);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// The ticks of `period` from `start` on which `job` runs, up to `until`, as
    /// offsets from `start`.
    fn runs(job: &mut Every, start: Instant, period: Duration, until: Duration) -> Vec<Duration> {
        let mut tick = start + period;
        let mut ran = Vec::new();
        while tick <= start + until {
            if job.due(tick) {
                ran.push(tick - start);
            }
            tick += period;
        }
        ran
    }

    #[test]
    fn a_job_as_frequent_as_the_ticks_runs_on_every_tick() {
        let start = Instant::now();
        let mut flush = Every::new(10 * MS, start);
        assert_eq!(
            runs(&mut flush, start, 10 * MS, 50 * MS),
            [10 * MS, 20 * MS, 30 * MS, 40 * MS, 50 * MS]
        );
    }

    #[test]
    fn a_job_keeps_its_interval_over_ticks_that_do_not_divide_it() {
        let start = Instant::now();
        let mut sweep = Every::new(25 * MS, start);
        // Due at 25, 50, 75, 100: four runs in 100 ms, each on the first tick after.
        assert_eq!(
            runs(&mut sweep, start, 10 * MS, 100 * MS),
            [30 * MS, 50 * MS, 80 * MS, 100 * MS]
        );
    }

    #[test]
    fn the_first_run_is_one_interval_after_the_start_whatever_the_grid() {
        let start = Instant::now();
        let mut job = Every::new(10 * MS, start);
        assert!(!job.due(start + 9 * MS));
        assert!(job.due(start + 13 * MS));
        // Next due at 20, not at 23: the late tick does not push the job back.
        assert!(job.due(start + 20 * MS));
    }

    #[test]
    fn a_worker_held_up_runs_a_late_job_once_then_an_interval_later() {
        let start = Instant::now();
        let mut job = Every::new(10 * MS, start);
        assert!(job.due(start + 95 * MS));
        assert!(!job.due(start + 100 * MS), "no catching up on missed runs");
        assert!(job.due(start + 105 * MS));
    }

    #[test]
    fn the_ticker_stays_on_its_grid_and_skips_what_it_missed() {
        let start = Instant::now();
        let due = start + 10 * MS;
        // Sent a little late: the next tick is still on the grid.
        assert_eq!(next_due(due, 10 * MS, due + 3 * MS), start + 20 * MS);
        // Sent more than a period late: no burst of ticks to catch up.
        assert_eq!(next_due(due, 10 * MS, due + 35 * MS), due + 45 * MS);
    }
}
