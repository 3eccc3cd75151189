//! The fault schedule a seed draws: which fault, to whom, when, for how long.
//!
//! Faults come one after another, never two at once, so that what each one may
//! cost is known: only a killed run can lose ids, and only those it answered in
//! its last moments (see `truth.rs`). Kinds are dealt from a shuffled deck of all
//! six, so that even a short run has each kind once. [`Spacing`] keeps faults far
//! enough apart. The times here are the plan, from the start of the run (a window
//! boundary); `run.rs` may start a fault later than planned when the fault before
//! it took longer, and logs when each really happened.

use std::fmt;
use std::time::Duration;

use super::rng::Rng;

/// One fault of the schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// When it starts, from the start of the run.
    pub at: Duration,
    /// How long it lasts (a restart: how long the instance stays down); zero for
    /// the instant ones.
    pub lasts: Duration,
    pub kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The instance's link to Redis is held (its proxy passes nothing).
    Stall { instance: usize },
    /// The instance is stopped (SIGSTOP), then continued (SIGCONT).
    Pause { instance: usize },
    /// The instance is killed (SIGKILL), then started again under the same name.
    Kill { instance: usize },
    /// Redis is killed and started again, empty.
    RedisRestart,
    /// `FLUSHALL`.
    Flush,
    /// Redis is stopped (SIGSTOP), then continued.
    RedisPause,
}

impl Kind {
    /// Redis loses data: whatever only Redis and a dead run held is gone for good.
    pub fn loses_data(self) -> bool {
        matches!(self, Kind::RedisRestart | Kind::Flush)
    }
}

/// What the schedule is drawn for.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub instances: usize,
    pub window: Duration,
    pub fleet_wait: Duration,
    /// Faults start and end within this much of the run.
    pub run: Duration,
}

/// The name of instance `i`: `a`, `b`, `c`, …
pub fn name(i: usize) -> String {
    char::from(b'a' + u8::try_from(i).unwrap()).to_string()
}

/// How far apart faults must be, so that only a kill's last moments can lose
/// ids: the one rule the plan is drawn with and the run is held to (with the
/// times that really happened). Times are from the start of the run, a window
/// boundary.
#[derive(Debug, Clone)]
pub struct Spacing {
    window: Duration,
    fleet_wait: Duration,
    last_end: Duration,
    last_loss: Option<Duration>,
    last_kill: Option<Duration>,
}

/// Least time between two faults.
const BETWEEN: Duration = Duration::from_millis(500);
/// Least time between the end of a fault and a kill: an instance whose link
/// was held, or that was paused, or all of them after Redis was paused, has
/// delivered its backlog by then (retries back off to 1 s at most).
const BEFORE_KILL: Duration = Duration::from_millis(2500);

impl Spacing {
    pub fn new(plan: &Plan) -> Spacing {
        Spacing {
            window: plan.window,
            fleet_wait: plan.fleet_wait,
            last_end: Duration::ZERO,
            last_loss: None,
            last_kill: None,
        }
    }

    /// The earliest a fault of `kind` may start:
    /// - a kill, [`BEFORE_KILL`] after the fault before, and once the window in
    ///   which Redis last lost data has ended and been surveyed (each instance
    ///   sends its lost ids again as it settles that window);
    /// - a loss of Redis data, once the window of the last kill is published (its
    ///   fleet wait, and a window more for the fleet to adopt it): from then on,
    ///   the killed run's ids live only in Redis, and nobody could send them
    ///   again. `run.rs` also waits for the record itself on the topic.
    pub fn earliest(&self, kind: Kind) -> Duration {
        let mut earliest = self.last_end + BETWEEN;
        if let Kind::Kill { .. } = kind {
            earliest = earliest.max(self.last_end + BEFORE_KILL);
            if let Some(loss) = self.last_loss {
                earliest = earliest.max(self.end_of_window(loss) + 3 * BETWEEN);
            }
        }
        if let (true, Some(kill)) = (kind.loses_data(), self.last_kill) {
            earliest = earliest.max(self.end_of_window(kill) + self.fleet_wait + self.window);
        }
        earliest
    }

    /// A fault of `kind` happened from `start` to `end`.
    pub fn happened(&mut self, kind: Kind, start: Duration, end: Duration) {
        self.last_end = end;
        if kind.loses_data() {
            self.last_loss = Some(end);
        }
        if let Kind::Kill { .. } = kind {
            self.last_kill = Some(start);
        }
    }

    /// `at`, moved later by whole windows until no earlier than `earliest`: a
    /// fault held back keeps its place relative to the boundaries.
    pub fn no_earlier(&self, at: Duration, earliest: Duration) -> Duration {
        let mut at = at;
        while at < earliest {
            at += self.window;
        }
        at
    }

    fn end_of_window(&self, t: Duration) -> Duration {
        let window = self.window.as_millis() as u64;
        Duration::from_millis((t.as_millis() as u64 / window + 1) * window)
    }
}

/// The schedule of `seed` for `plan`.
pub fn draw(seed: u64, plan: &Plan) -> Vec<Fault> {
    let mut rng = Rng::new(seed);
    let window = plan.window.as_millis() as u64;
    let wait = plan.fleet_wait.as_millis() as u64;
    let mut spacing = Spacing::new(plan);
    // The first window runs clean: every instance has sent ids to the fleet.
    spacing.last_end = plan.window;
    let mut deck = Vec::new();
    let mut faults = Vec::new();
    loop {
        if deck.is_empty() {
            deck = deal(&mut rng);
        }
        let instance = rng.below(plan.instances as u64) as usize;
        let kind = match deck.pop().unwrap() {
            0 => Kind::Stall { instance },
            1 => Kind::Pause { instance },
            2 => Kind::Kill { instance },
            3 => Kind::RedisRestart,
            4 => Kind::Flush,
            _ => Kind::RedisPause,
        };
        let earliest = spacing.earliest(kind).as_millis() as u64;
        let mut at = spacing.last_end.as_millis() as u64 + rng.millis(500, 2000);
        at = at.max(earliest);
        let lasts = match kind {
            // Half shorter than the fleet wait, half longer; half of each from just
            // before a boundary, across it.
            Kind::Stall { .. } => {
                let lasts = if rng.chance(50) {
                    rng.millis(300, wait - 200)
                } else {
                    rng.millis(wait + 200, wait + 3500)
                };
                if rng.chance(50) {
                    let before = rng.millis(100, 400);
                    at = (at + before).next_multiple_of(window) - before;
                    lasts.max(before + 200)
                } else {
                    lasts
                }
            }
            Kind::Pause { .. } => rng.millis(300, wait + 1000),
            Kind::Kill { .. } => rng.millis(300, 3000),
            Kind::RedisRestart | Kind::Flush => 0,
            Kind::RedisPause => rng.millis(300, wait + 1500),
        };
        if Duration::from_millis(at + lasts) + plan.window > plan.run {
            return faults;
        }
        let fault = Fault {
            at: Duration::from_millis(at),
            lasts: Duration::from_millis(lasts),
            kind,
        };
        // A restarted instance takes a moment to join the fleet again.
        let ends = fault.at + fault.lasts + Duration::from_secs(1);
        spacing.happened(kind, fault.at, ends);
        faults.push(fault);
    }
}

/// The six kinds in an order of the seed's.
fn deal(rng: &mut Rng) -> Vec<u8> {
    let mut deck: Vec<u8> = (0..6).collect();
    for i in (1..deck.len()).rev() {
        deck.swap(i, rng.below(i as u64 + 1) as usize);
    }
    deck
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (at, lasts) = (self.at.as_secs_f64(), self.lasts.as_secs_f64());
        match self.kind {
            Kind::Stall { instance } => write!(
                f,
                "+{at:.3}s hold {}'s link to Redis for {lasts:.3}s",
                name(instance)
            ),
            Kind::Pause { instance } => {
                write!(f, "+{at:.3}s SIGSTOP {} for {lasts:.3}s", name(instance))
            }
            Kind::Kill { instance } => write!(
                f,
                "+{at:.3}s SIGKILL {}, restarted {lasts:.3}s later",
                name(instance)
            ),
            Kind::RedisRestart => write!(f, "+{at:.3}s Redis restarted empty"),
            Kind::Flush => write!(f, "+{at:.3}s FLUSHALL"),
            Kind::RedisPause => write!(f, "+{at:.3}s SIGSTOP Redis for {lasts:.3}s"),
        }
    }
}
