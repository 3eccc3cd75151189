//! The open connections of one worker: the cap on their number, the deadline each
//! one is under, and the sweep that enforces the deadlines.
//!
//! A connection's task says what it waits for (`Wait`) each time that changes;
//! that is a few `Cell` stores against a clock the worker moves on each tick, so
//! the request path arms no timer and makes no system call for its deadlines. The
//! sweep runs about ten times per shortest timeout and shuts down the socket of
//! each connection past its deadline, which wakes the task's pending read (or
//! write) at once; the task then answers 408 if it holds half a request, and
//! closes. Shutdown of the service reaches idle keep-alive connections the same
//! way, and the linger after an error response ends the same way at its own
//! deadline, `LINGER_TIME`, which is no timeout of the client's and is not
//! counted as one.
//!
//! Deadlines are never early: the clock lags by up to one tick, which is no longer
//! than a sweep interval, so each deadline gets one sweep interval more. The sweep
//! runs on the first tick at or after it is due, so a connection closes between
//! its timeout and its timeout plus two sweep intervals and a tick (plus however
//! late the worker wakes). The linger gets no such slack: it is the server's own
//! bound, and lasts from about `LINGER_TIME` to a sweep interval more.
//!
//! Invariant: only open sockets are registered. A task deregisters (drops its
//! `Registration`) no later than its stream is closed, and everything here runs
//! on the worker's one thread, so a registered fd is never a closed or reused one.

use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;

use super::counter::bump;

/// After an error response, how long a connection reads and discards what the
/// client still sends before it closes; see `Connection::linger`.
const LINGER_TIME: Duration = Duration::from_secs(1);

/// How long a client may take, per thing it can keep a connection waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// From a request's first byte (or the connection's opening) to its last.
    pub head: Duration,
    /// Between requests on a keep-alive connection.
    pub idle: Duration,
    /// For the client to take a response off the socket.
    pub write: Duration,
}

impl Timeouts {
    pub const DEFAULT: Timeouts = Timeouts {
        head: Duration::from_secs(10),
        idle: Duration::from_secs(60),
        write: Duration::from_secs(10),
    };

    /// How often deadlines are checked: a tenth of the shortest timeout, at least
    /// 10 ms (100 sweeps a second at most) and at most a second.
    pub fn sweep_interval(&self) -> Duration {
        let shortest = self.head.min(self.idle).min(self.write);
        (shortest / 10).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts::DEFAULT
    }
}

/// What a connection is waiting for, which decides its deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// The rest of a request, or the first request of a new connection.
    Head = 0,
    /// The next request on a keep-alive connection.
    Idle = 1,
    /// The client to read what was written.
    Write = 2,
    /// Nothing the client owes: after an error response, the connection discards
    /// input for [`LINGER_TIME`]. Its end is no timeout: not counted, no label.
    Linger = 3,
}

/// Every [`Wait`] a client can time out on, with its metric label, in declaration
/// order (so `wait as usize` indexes it).
pub(crate) const WAITS: [(Wait, &str); 3] = [
    (Wait::Head, "head"),
    (Wait::Idle, "idle"),
    (Wait::Write, "write"),
];

/// What the sweep knows about one connection; its task keeps it current.
struct Watch {
    fd: RawFd,
    wait: Cell<Wait>,
    /// When the wait began, by the registry's clock. The sweep adds the wait's
    /// allowance, so that a connection changing what it waits for (twice a
    /// request) only copies the clock.
    since: Cell<Instant>,
    /// Set by the sweep, cleared when the connection waits for something new.
    expired: Cell<bool>,
}

/// What a worker's registry counts, for `/metrics`: only the worker writes them.
#[derive(Debug, Default)]
pub(crate) struct ConnectionCounters {
    pub(crate) open: AtomicU64,
    /// New connections closed at once: the worker held as many as it may.
    pub(crate) refused: AtomicU64,
    /// Connections closed for missing the deadline of what they waited for, by
    /// [`WAITS`] (the end of a linger is not one).
    pub(crate) timed_out: [AtomicU64; WAITS.len()],
}

impl ConnectionCounters {
    fn set_open(&self, n: usize) {
        self.open.store(n as u64, Ordering::Relaxed);
    }

    pub(crate) fn timed_out(&self, wait: Wait) {
        bump(&self.timed_out[wait as usize]);
    }
}

/// The open connections of one worker.
pub(crate) struct Registry {
    /// How long each [`Wait`] may last, indexed by `wait as usize`: its timeout
    /// plus the sweep interval (the clock lags by up to one, and no deadline may be
    /// early), or [`LINGER_TIME`] for the linger, the server's own bound.
    allowed: [Duration; 4],
    capacity: usize,
    counters: Arc<ConnectionCounters>,
    /// The time as of the worker's last tick: coarse, but free to read.
    clock: Cell<Instant>,
    open: RefCell<Slab<Rc<Watch>>>,
}

/// Why a connection was not registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AtCapacity;

impl Registry {
    pub(crate) fn new(
        timeouts: Timeouts,
        capacity: usize,
        counters: Arc<ConnectionCounters>,
    ) -> Self {
        let slack = timeouts.sweep_interval();
        Registry {
            allowed: [
                timeouts.head + slack,
                timeouts.idle + slack,
                timeouts.write + slack,
                LINGER_TIME,
            ],
            capacity,
            counters,
            clock: Cell::new(Instant::now()),
            open: RefCell::new(Slab::new()),
        }
    }

    /// Registers a new connection, waiting for its first request head; refused
    /// (and counted) when the worker already holds as many as it may.
    pub(crate) fn register(self: &Rc<Self>, fd: RawFd) -> Result<Registration, AtCapacity> {
        let mut open = self.open.borrow_mut();
        if open.len() >= self.capacity {
            bump(&self.counters.refused);
            return Err(AtCapacity);
        }
        let watch = Rc::new(Watch {
            fd,
            wait: Cell::new(Wait::Head),
            since: Cell::new(self.clock.get()),
            expired: Cell::new(false),
        });
        let key = open.insert(watch.clone());
        self.counters.set_open(open.len());
        Ok(Registration {
            registry: self.clone(),
            key,
            watch,
        })
    }

    fn deadline(&self, watch: &Watch) -> Instant {
        watch.since.get() + self.allowed[watch.wait.get() as usize]
    }

    pub(crate) fn len(&self) -> usize {
        self.open.borrow().len()
    }

    /// Sets the clock that new deadlines start from and the sweep checks them against.
    pub(crate) fn set_clock(&self, now: Instant) {
        self.clock.set(now);
    }

    /// Closes every connection past its deadline, as of the clock.
    pub(crate) fn sweep(&self) {
        let now = self.clock.get();
        for (_, watch) in self.open.borrow().iter() {
            if watch.expired.get() || self.deadline(watch) > now {
                continue;
            }
            watch.expired.set(true);
            let wait = watch.wait.get();
            if wait != Wait::Linger {
                self.counters.timed_out(wait);
            }
            // Shutting down the read side ends a pending read with end-of-stream,
            // and leaves the write side open for a 408 (a lingering connection has
            // shut it already). A stalled write needs the write side shut too,
            // which fails it.
            let how = match wait {
                Wait::Head | Wait::Idle | Wait::Linger => libc::SHUT_RD,
                Wait::Write => libc::SHUT_RDWR,
            };
            // SAFETY: registered fds are open sockets (module invariant); shutdown
            // neither closes nor reuses the fd.
            unsafe { libc::shutdown(watch.fd, how) };
        }
    }

    /// Ends the read side of every open connection, so idle ones see end-of-stream
    /// at once while requests already received are still answered.
    pub(crate) fn shut_reads(&self) {
        for (_, watch) in self.open.borrow().iter() {
            // SAFETY: as in `sweep`.
            unsafe { libc::shutdown(watch.fd, libc::SHUT_RD) };
        }
    }
}

/// A connection's place in the [`Registry`], given up when dropped.
pub(crate) struct Registration {
    registry: Rc<Registry>,
    /// Held by this registration alone until it drops; the slab then reuses it.
    key: usize,
    watch: Rc<Watch>,
}

impl Registration {
    /// The connection now waits for `wait`; its deadline starts now.
    #[inline]
    pub(crate) fn wait_for(&self, wait: Wait) {
        self.watch.wait.set(wait);
        self.watch.since.set(self.registry.clock.get());
        self.watch.expired.set(false);
    }

    /// What the connection was last said to wait for.
    #[inline]
    pub(crate) fn waiting_for(&self) -> Wait {
        self.watch.wait.get()
    }

    /// Whether the sweep closed the connection for missing the deadline of what it
    /// last waited for.
    pub(crate) fn expired(&self) -> bool {
        self.watch.expired.get()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut open = self.registry.open.borrow_mut();
        open.remove(self.key);
        self.registry.counters.set_open(open.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(capacity: usize) -> Rc<Registry> {
        Rc::new(Registry::new(Timeouts::DEFAULT, capacity, Arc::default()))
    }

    fn sweep_at(registry: &Registry, now: Instant) {
        registry.set_clock(now);
        registry.sweep();
    }

    #[test]
    fn the_sweep_interval_follows_the_shortest_timeout() {
        assert_eq!(Timeouts::DEFAULT.sweep_interval(), Duration::from_secs(1));
        let short = Timeouts {
            head: Duration::from_millis(300),
            ..Timeouts::DEFAULT
        };
        assert_eq!(short.sweep_interval(), Duration::from_millis(30));
        let tiny = Timeouts {
            write: Duration::from_millis(1),
            ..Timeouts::DEFAULT
        };
        assert_eq!(tiny.sweep_interval(), Duration::from_millis(10));
    }

    #[test]
    fn registrations_count_against_the_capacity_until_dropped() {
        let registry = registry(2);
        let first = registry.register(-1).unwrap();
        let _second = registry.register(-1).unwrap();
        assert_eq!(registry.register(-1).err(), Some(AtCapacity));
        drop(first);
        assert_eq!(registry.len(), 1);
        assert!(registry.register(-1).is_ok());
    }

    #[test]
    fn a_reused_key_belongs_to_the_new_registration_alone() {
        let registry = registry(10);
        let first = registry.register(-1).unwrap();
        let second = registry.register(-1).unwrap();
        let freed = first.key;
        drop(first);
        let third = registry.register(-1).unwrap();
        assert_eq!(third.key, freed);
        drop(second);
        assert_eq!(registry.len(), 1);
        assert!(Rc::ptr_eq(&registry.open.borrow()[freed], &third.watch));
        drop(third);
        assert_eq!(registry.len(), 0);
    }

    #[test]
    fn a_connection_expires_only_past_the_deadline_of_what_it_waits_for() {
        let registry = registry(10);
        let start = registry.clock.get();
        let conn = registry.register(-1).unwrap();
        conn.wait_for(Wait::Idle);
        sweep_at(&registry, start + Timeouts::DEFAULT.head * 2);
        assert!(!conn.expired(), "idle, so the head timeout does not apply");
        sweep_at(&registry, start + Timeouts::DEFAULT.idle);
        assert!(
            !conn.expired(),
            "the clock may lag: one sweep interval of slack"
        );
        sweep_at(
            &registry,
            start + Timeouts::DEFAULT.idle + Timeouts::DEFAULT.sweep_interval(),
        );
        assert!(conn.expired());
        assert_eq!(conn.waiting_for(), Wait::Idle);

        // Waiting for something new starts a new deadline, enforced again.
        conn.wait_for(Wait::Write);
        assert!(!conn.expired());
        let later =
            registry.clock.get() + Timeouts::DEFAULT.write + Timeouts::DEFAULT.sweep_interval();
        sweep_at(&registry, later);
        assert!(conn.expired());
    }

    #[test]
    fn new_deadlines_start_from_the_clock_the_ticks_move() {
        let registry = registry(10);
        let start = registry.clock.get();
        let conn = registry.register(-1).unwrap();
        registry.set_clock(start + Duration::from_secs(30));
        conn.wait_for(Wait::Idle);
        sweep_at(
            &registry,
            start + Timeouts::DEFAULT.idle + Timeouts::DEFAULT.sweep_interval(),
        );
        assert!(!conn.expired(), "the idle timeout started 30 s in");
        sweep_at(
            &registry,
            start
                + Duration::from_secs(30)
                + Timeouts::DEFAULT.idle
                + Timeouts::DEFAULT.sweep_interval(),
        );
        assert!(conn.expired());
    }

    #[test]
    fn a_lingering_connection_ends_at_its_deadline_without_counting_a_timeout() {
        let counters = Arc::new(ConnectionCounters::default());
        let registry = Rc::new(Registry::new(Timeouts::DEFAULT, 10, counters.clone()));
        let start = registry.clock.get();
        let idle = registry.register(-1).unwrap();
        idle.wait_for(Wait::Idle);
        let lingering = registry.register(-1).unwrap();
        lingering.wait_for(Wait::Linger);

        sweep_at(&registry, start + LINGER_TIME - Duration::from_millis(1));
        assert!(!lingering.expired());
        sweep_at(&registry, start + LINGER_TIME);
        assert!(
            lingering.expired(),
            "no slack: the linger is the server's bound"
        );
        sweep_at(
            &registry,
            start + Timeouts::DEFAULT.idle + Timeouts::DEFAULT.sweep_interval(),
        );
        assert!(idle.expired());
        let timed_out = counters
            .timed_out
            .each_ref()
            .map(|n| n.load(Ordering::Relaxed));
        assert_eq!(
            timed_out,
            [0, 1, 0],
            "the idle connection timed out (head, idle, write); the lingering one did not"
        );
    }
}
