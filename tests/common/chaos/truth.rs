//! What each window's count must be, from the client log and the kills.
//!
//! An `ok` whose request was sent and answered in one window is *certain* there
//! (the instance reads its clock between the two). An `ok` whose request and
//! answer straddle a boundary (an instance paused across it), and a request that
//! got no answer, are *maybe*: counted in one of the windows they span, or not.
//! So a window's count lies between `certain` and `certain ∪ maybe`.
//!
//! The allowance: a run killed with SIGKILL takes with it the ids it answered but
//! had not yet handed to Redis (a worker's batch, at most `VERVE_FLUSH_MS` old,
//! and the round in flight). An id is *allowed* to be missing from a window only
//! if every certain `ok` of it in that window came from a killed run within
//! [`KILL_HORIZON`] before the kill, and Redis did not hold it just after the
//! kill (`run.rs` asks, once the dead run's last bytes had time to arrive):
//! nobody else had it, so nobody else could deliver it. The schedule keeps every
//! other fault away from a kill (`schedule::Spacing`), so nothing else can lose
//! an id.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use verve::window::{WindowLength, WindowStart};

use super::clients::{Outcome, Request, ANSWER_TIMEOUT};

/// How long before a SIGKILL an `ok` may still be only in the killed process:
/// `VERVE_FLUSH_MS` (10 ms) and the forwarder's round in flight, a few ms, but
/// on a two-core machine at a load of 14 ids were seen still undelivered 1.2 s
/// after their `ok`. Only ids Redis did not hold after the kill are allowed,
/// so this bounds the allowance without widening it.
pub const KILL_HORIZON: Duration = Duration::from_secs(3);

/// A run killed: instance, run number, when it was sent SIGKILL, when the next
/// run started (its `ok`s cannot come later).
#[derive(Debug, Clone)]
pub struct Kill {
    pub instance: usize,
    pub run: u32,
    pub name: String,
    pub at: SystemTime,
    pub restarted: SystemTime,
    /// The `ok`s of the run's last [`KILL_HORIZON`] that Redis did not hold
    /// just after the kill (not lost if another instance also had the id).
    pub undelivered: Vec<Undelivered>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Undelivered {
    pub id: i64,
    pub window: WindowStart,
    /// How long before the kill it was answered.
    pub age: Duration,
}

#[derive(Debug, Default, Clone)]
pub struct WindowTruth {
    pub certain: BTreeSet<i64>,
    /// Not in `certain`.
    pub maybe: BTreeSet<i64>,
    /// Certain ids allowed to be missing, by the kill (index) that allows them.
    pub allowed: BTreeMap<usize, BTreeSet<i64>>,
}

impl WindowTruth {
    pub fn lower(&self) -> u64 {
        self.certain.len() as u64
    }

    pub fn upper(&self) -> u64 {
        (self.certain.len() + self.maybe.len()) as u64
    }

    pub fn allowed(&self) -> u64 {
        self.allowed.values().map(|ids| ids.len() as u64).sum()
    }
}

#[derive(Debug, Default)]
pub struct Truth {
    pub windows: BTreeMap<WindowStart, WindowTruth>,
    pub oks: u64,
    /// `ok`s straddling a boundary.
    pub straddling: u64,
    /// Requests without an answer.
    pub unanswered: u64,
}

impl Truth {
    pub fn of(log: &[Request], kills: &[Kill], length: WindowLength) -> Truth {
        let mut truth = Truth::default();
        // Per window and certain id: the kill that allows it, while every `ok`
        // so far is in one's horizon (None once one is not).
        let mut sole: BTreeMap<(WindowStart, i64), Option<usize>> = BTreeMap::new();
        for request in log {
            let first = length.window_of(request.sent);
            let last = match request.outcome {
                Outcome::Refused => continue,
                Outcome::Ok => {
                    truth.oks += 1;
                    length.window_of(request.answered)
                }
                // A paused instance may read the request after the client gave up.
                Outcome::Unknown { timed_out: true } => {
                    truth.unanswered += 1;
                    length.window_of(request.answered + ANSWER_TIMEOUT)
                }
                Outcome::Unknown { timed_out: false } => {
                    truth.unanswered += 1;
                    length.window_of(request.answered)
                }
            };
            if request.outcome == Outcome::Ok && first == last {
                truth.windows.entry(first).or_default();
                let horizon = kills.iter().position(|k| {
                    (k.instance, k.run) == (request.instance, request.run)
                        && request.answered + KILL_HORIZON >= k.at
                        && request.answered < k.restarted
                        && k.undelivered
                            .iter()
                            .any(|u| (u.id, u.window) == (request.id, first))
                });
                let entry = sole.entry((first, request.id)).or_insert(horizon);
                if horizon.is_none() {
                    *entry = None;
                }
                continue;
            }
            if request.outcome == Outcome::Ok {
                truth.straddling += 1;
            }
            let mut window = first;
            while window <= last {
                truth
                    .windows
                    .entry(window)
                    .or_default()
                    .maybe
                    .insert(request.id);
                window = length.next(window);
            }
        }
        for ((window, id), kill) in sole {
            let entry = truth.windows.get_mut(&window).unwrap();
            entry.certain.insert(id);
            entry.maybe.remove(&id);
            if let Some(kill) = kill {
                entry.allowed.entry(kill).or_default().insert(id);
            }
        }
        truth
    }
}
