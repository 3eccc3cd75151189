//! A model checker for the fleet protocol (issue 23): one window, two or three
//! instances whose runs may die and restart, and one Redis that may lose its data,
//! with every interleaving of their steps explored breadth first and checked
//! after each step against what the fleet promises (docs/operations.md, "What the
//! fleet guarantees"):
//!
//! - **I1** no published count is above the truth, the ids answered `ok`;
//! - **I2** a record published `complete=true` counts every id answered `ok`,
//!   except an id answered before Redis lost its data whose every holder has
//!   died since (nobody is left to send it again: the documented loss);
//! - **I3** one revision number never names two contents;
//! - **I4** each revision published is above every one published before, and
//!   its count is not below theirs unless Redis lost data in between;
//! - **I5** once the fleet's wait is over and faults stop, live runs that
//!   heartbeat, deliver, close and check publish the window, if a live run
//!   holds one of its ids or Redis does.
//!
//! Redis's side is the Lua scripts, its atomic steps, transcribed as functions
//! that cite the lines they follow (`settle.lua`, `heartbeat.lua`, `count.lua`
//! with the round's `MULTI`, `roster.lua` and `tally.lua`); the runs' side
//! follows `forwarder.rs` and `fleet.rs` and takes every decision that `rules`
//! makes from `rules` itself, so that a change there is checked here. Time is
//! five phases (more than a fleet wait before the window, within one before
//! it, in it, after it, after the fleet's wait), which is what every rule
//! compares; a heartbeat's expiry is either current or the phase it lapsed in.
//! A run keeps its lease only while its heartbeat is current (one renewed in
//! the first phase ends with it), and after a loss no time passes until every
//! run that held a lease has heartbeated again or lapsed (it would within a
//! lease term). Redis's clock moves on between two marks and two epochs, and a
//! loss does not turn it back.
//!
//! The search is breadth first over hashed states, so the first violation has
//! a shortest trace, printed one step a line with Redis's state after it. Redis
//! may lose its data at any step. The two violations it found (issue 23) are
//! kept as replays of their traces (`tests.rs`): a run unseen before a loss
//! could make a record complete after it, and a settle after a loss trusted a
//! survey (or a generation) from before it.
//!
//! What is left out, each a simplification the search cannot see through: one
//! shard; a Redis call always answers (a cut-off run simply takes no step, and
//! lapses); a survey is atomic, and so is a replay (its `sending` mark and its
//! round); the `SREM` of a released window runs with the script that released
//! it; runs never leave (SIGTERM), never skip windows, and remember every run they
//! saw live (the real horizon is two fleet waits: remembering more only waits
//! longer); a loss is a `FLUSHALL` (everything gone at once), not a rollback to a
//! snapshot; keys never expire (the model's span is shorter than their TTL).

use std::collections::{HashMap, VecDeque};
use std::fmt::Write;

use super::rules::{self, Registered, Remembered};
use crate::window::WindowStart;

const WINDOW: WindowStart = WindowStart::from_unix_secs(600);
const WINDOW_SECS: u64 = 60;
const WAIT_MS: u64 = 5_000;
/// Runs, at most: three instances run twice each, or two run three times.
const RUNS: usize = 6;

/// A run's slot: instance `slot % instances`, its `slot / instances + 1`-th run.
type Run = usize;
/// A set of ids, bit i for id i.
type Ids = u8;
/// A set of runs, bit r for run r.
type Runs = u8;

fn ids_in(ids: Ids) -> u8 {
    ids.count_ones() as u8
}

fn runs_in(runs: Runs) -> impl Iterator<Item = Run> {
    (0..8).filter(move |r| runs & (1 << r) != 0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Phase {
    /// More than a fleet wait before the window: a lease granted now ends, and a
    /// heartbeat sent now expires, before the next phase.
    Early,
    /// Within a fleet wait of its start.
    Before,
    During,
    After,
    WaitOver,
}

impl Phase {
    /// A moment of the phase, by Redis's clock and every host's (they agree here).
    fn now_ms(self) -> u64 {
        let start = WINDOW.unix_secs() * 1000;
        let end = start + WINDOW_SECS * 1000;
        match self {
            Phase::Early => start - 30_000,
            Phase::Before => start - 1_000,
            Phase::During => start + 30_000,
            Phase::After => end + 1_000,
            Phase::WaitOver => end + WAIT_MS + 1_000,
        }
    }

    /// The window of `now_ms`: a run starting now registers it as its first, and a
    /// loss noticed now is noticed in it.
    fn window(self) -> WindowStart {
        match self {
            Phase::Early | Phase::Before => {
                WindowStart::from_unix_secs(WINDOW.unix_secs() - WINDOW_SECS)
            }
            Phase::During => WINDOW,
            Phase::After | Phase::WaitOver => {
                WindowStart::from_unix_secs(WINDOW.unix_secs() + WINDOW_SECS)
            }
        }
    }

    fn next(self) -> Option<Phase> {
        match self {
            Phase::Early => Some(Phase::Before),
            Phase::Before => Some(Phase::During),
            Phase::During => Some(Phase::After),
            Phase::After => Some(Phase::WaitOver),
            Phase::WaitOver => None,
        }
    }
}

/// When a run's heartbeat expires, as the registry scores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Expiry {
    /// A fleet wait after its last heartbeat, which is recent.
    Live,
    /// It expired during that phase.
    LapsedIn(Phase),
}

impl Expiry {
    fn ms(self, now: Phase) -> u64 {
        match self {
            Expiry::Live => now.now_ms() + WAIT_MS,
            Expiry::LapsedIn(phase) => phase.now_ms() - 500,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Entry {
    first: WindowStart,
    expiry: Expiry,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Mark {
    Sending,
    Full,
    Partial,
}

/// `<number>:<tag>:<began>`, with tags numbered in the order epochs were set
/// (distinct, as the real `run@ms` tags are), and the phase `heartbeat.lua` set
/// it in: its time, by Redis's clock, is the phase's and as many ms as the tag
/// (Redis's clock moves on between two losses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Epoch {
    number: u64,
    tag: u8,
    began: Phase,
}

impl Epoch {
    fn text(self) -> String {
        let began_ms = self.began.now_ms() + u64::from(self.tag);
        format!("{}:{}:{began_ms}", self.number, self.tag)
    }

    /// `next`, as `rules::next_epoch` wrote it, set at `now`.
    fn set(next: &str, now: Phase) -> Epoch {
        let tag = next.split_once(':').map_or("0", |(_, tag)| tag);
        Epoch {
            number: rules::epoch_number(next),
            tag: tag.parse().expect("tags the model wrote"),
            began: now,
        }
    }
}

/// `P:{W}:record`'s fields (but `acked` and `published_at`, which no decision
/// here reads), and the ids its count counted: not in Redis, but what I2 checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Record {
    revision: u64,
    count: u8,
    complete: bool,
    partial: bool,
    instances: u8,
    by: Run,
    counted: Ids,
}

impl Record {
    /// What a consumer reads of it.
    fn content(&self) -> (u8, bool, bool, u8) {
        (self.count, self.complete, self.partial, self.instances)
    }
}

/// The window's keys and the registry's, for one window with one shard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
struct Redis {
    /// `P:{W}`.
    ids: Ids,
    /// `P:{W}:delivered` and `P:{W}:rounds`, per run (0 rounds: no field).
    delivered: [Option<u8>; RUNS],
    rounds: [u8; RUNS],
    /// `P:{W}:marks`.
    marks: [Option<Mark>; RUNS],
    /// `P:{W}:record` without its generation, which is `generation`.
    record: Option<Record>,
    generation: u64,
    /// `TIME`, as far as the model needs it: it moves on between two marks, and
    /// a loss of data does not turn it back.
    clock: u64,
    /// `P:{fleet}:instances` (the expiry) and `…:joined` (the first window).
    registry: [Option<Entry>; RUNS],
    /// `P:{fleet}:epoch`.
    epoch: Option<Epoch>,
    /// Whether `P:{fleet}:orphans` lists the window.
    orphans: bool,
}

/// `settle.lua`'s ARGV[3]: '0' or '1' ('alone', a leaving run's, is not modelled).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Force {
    No,
    Yes,
}

/// `settle.lua`'s arguments.
struct SettleCall {
    me: Run,
    /// ARGV[2]: `None` for ''.
    mark: Option<Mark>,
    force: Force,
    /// ARGV[6]: `None` for ''.
    generation: Option<u64>,
    /// ARGV[7], and the ids it counts.
    count: u8,
    counted: Ids,
    /// ARGV[8..15].
    known: Option<Record>,
    /// ARGV[16].
    first_revision: u64,
    /// ARGV[17]: the window began within a fleet wait of the epoch.
    never_complete: bool,
    /// ARGV[19..18+L] and ARGV[19+L..].
    live: Runs,
    more: Runs,
}

/// What `settle.lua` answers first: 'gone', 'again', 'published', 'known', 'pending'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Gone,
    Again,
    Published,
    Known,
    Pending,
}

struct SettleAnswer {
    outcome: Outcome,
    record: Option<Record>,
    generation: u64,
    members: Runs,
    release: bool,
}

/// `settle.lua`, line by line.
fn settle_lua(redis: &mut Redis, call: &SettleCall) -> SettleAnswer {
    let answer = |outcome, generation, release| SettleAnswer {
        outcome,
        record: None,
        generation,
        members: 0,
        release,
    };
    // 79: stored(): revision 0 and zeros when the hash has no record.
    let mut record = redis.record;
    // 80-82
    if call.mark.is_none() && record.is_none() && redis.marks.iter().all(Option::is_none) {
        return answer(Outcome::Gone, 0, true);
    }
    // 83-90: a mark that makes the run done sets a new generation: Redis's clock,
    // or one past the last.
    let mut generation = redis.generation;
    if let Some(mark) = call.mark {
        if redis.marks[call.me] != Some(mark) {
            redis.marks[call.me] = Some(mark);
            redis.clock += 1;
            redis.generation = redis.clock.max(generation + 1);
            generation = redis.generation;
        }
    }
    // 91-92 renew the keys' TTLs; 93-95:
    if call.generation != Some(generation) {
        return answer(Outcome::Again, generation, false);
    }
    // 97-103: put back the latest record this run knows if Redis lost it.
    let revision = |record: &Option<Record>| record.map_or(0, |r| r.revision);
    if let Some(known) = call
        .known
        .filter(|known| known.revision > revision(&record))
    {
        record = Some(known);
        redis.record = record;
    }
    // 105-117
    let mut done = 0;
    let mut full = false;
    let mut members = 0;
    for (run, mark) in redis.marks.iter().enumerate() {
        let Some(mark) = mark else { continue };
        members |= 1 << run;
        if *mark != Mark::Sending {
            done += 1;
            full |= *mark == Mark::Full;
        }
    }
    // 118-141
    // (`others_pending` only matters to 'alone', a leaving run's force: not modelled.)
    let pending = |run: Run| matches!(redis.marks[run], None | Some(Mark::Sending));
    let waiting =
        runs_in(call.live | call.more).any(pending) || redis.marks.contains(&Some(Mark::Sending));
    // 143-170
    let complete = !waiting && !call.never_complete;
    let forced = call.force == Force::Yes;
    let (was_revision, was_count, was_complete) =
        record.map_or((0, 0, false), |r| (r.revision, r.count, r.complete));
    let floor = was_count.max(call.known.map_or(0, |known| known.count));
    let grown = call.count >= floor
        && (was_revision == 0 || call.count > was_count || complete && !was_complete);
    let outcome = if grown && (complete || forced) {
        record = Some(Record {
            revision: (was_revision + 1).max(call.first_revision),
            count: call.count,
            complete,
            partial: !full,
            instances: done,
            by: call.me,
            counted: call.counted,
        });
        redis.record = record;
        Outcome::Published
    } else if was_revision == 0 {
        Outcome::Pending
    } else {
        Outcome::Known
    };
    // 171-178
    let release = record.is_some_and(|r| r.complete) || (call.mark.is_none() && record.is_some());
    SettleAnswer {
        outcome,
        record,
        generation,
        members,
        release,
    }
}

/// `heartbeat.lua`, line by line: registers `run` (live, first window `first`),
/// sets `next` as the epoch, begun `now`, if Redis lost it or holds one no later
/// than the one the run `knows` but another; returns the epoch, the live runs
/// and whether the window is listed as unfinished.
fn heartbeat_lua(
    redis: &mut Redis,
    run: Run,
    first: WindowStart,
    knows: Option<Epoch>,
    (next, now): (&str, Phase),
) -> (Epoch, Runs, bool) {
    // 37-43: every run has the fleet's layout here. 44-54 forget runs lapsed
    // or left longer ago than the model spans.
    // 55-56
    redis.registry[run] = Some(Entry {
        first,
        expiry: Expiry::Live,
    });
    // 61-68
    let lost = match (redis.epoch, knows) {
        (None, _) => true,
        (Some(epoch), Some(knows)) => epoch != knows && epoch.number <= knows.number,
        (Some(_), None) => false,
    };
    if lost {
        redis.epoch = Some(Epoch::set(next, now));
    }
    // 72-79: ZRANGEBYSCORE now +inf: the runs whose heartbeat is current.
    let live = redis
        .registry
        .iter()
        .enumerate()
        .filter(|(_, entry)| entry.is_some_and(|e| e.expiry == Expiry::Live))
        .fold(0, |runs, (r, _)| runs | 1 << r);
    (redis.epoch.expect("set above"), live, redis.orphans)
}

/// A round of `ids` on one server (`Fleet::round`): in one `MULTI`, the `SADD`,
/// `count.lua` (lines 57-65: counted once per round number, `set` starting the
/// count again) and, for round 1 (or a replay), the `sending` mark and the note
/// in `P:{fleet}:orphans` (`Fleet::sending`).
fn round_multi(redis: &mut Redis, run: Run, ids: Ids, round: u8, set: bool, sending: bool) {
    redis.ids |= ids;
    if round > redis.rounds[run] {
        let before = if set {
            0
        } else {
            redis.delivered[run].unwrap_or(0)
        };
        redis.delivered[run] = Some(before + ids_in(ids));
        redis.rounds[run] = round;
    }
    if sending {
        redis.marks[run] = Some(Mark::Sending);
        redis.orphans = true;
    }
}

/// What a survey read: `roster.lua` (the epoch, the registry, the clock) and
/// `tally.lua` (the set's size, this run's delivered count, who delivered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Survey {
    epoch: Option<Epoch>,
    registry: [Option<Entry>; RUNS],
    now: Phase,
    count: u8,
    counted: Ids,
    mine: u8,
    delivered_by: Runs,
}

fn survey(redis: &Redis, run: Run, now: Phase) -> Survey {
    Survey {
        epoch: redis.epoch,
        registry: redis.registry,
        now,
        count: ids_in(redis.ids),
        counted: redis.ids,
        mine: redis.delivered[run].unwrap_or(0),
        delivered_by: redis
            .delivered
            .iter()
            .enumerate()
            .filter(|(_, d)| d.is_some())
            .fold(0, |runs, (r, _)| runs | 1 << r),
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
enum Life {
    #[default]
    Unstarted,
    Alive,
    Dead,
}

/// What a run knows of the window it settles (`WindowView`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
struct View {
    /// Its mark; `None` for a window it adopts.
    coverage: Option<Mark>,
    /// How many ids it delivered.
    delivered: u8,
    known: Option<Record>,
    members: Runs,
    generation: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Job {
    /// The window closed (`Forwarder::close`): its view is the run's `tracked`.
    Close,
    /// A check of a followed window (`Forwarder::check`).
    Check,
    /// A window left unfinished, adopted at a heartbeat (`Forwarder::adopt`),
    /// with its own view, dropped afterwards.
    Adopt(View),
}

/// Where a run is in `Forwarder::settle`'s loop: one Redis call per step, and any
/// other run's steps in between.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
enum Task {
    #[default]
    Idle,
    /// Next: a survey.
    Survey(Job, Force),
    /// Next: `settle.lua`, with what the survey found.
    Settle(Job, Force, Survey),
}

/// A run's process: what the forwarder and `Fleet` hold for the window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
struct Local {
    life: Life,
    /// The window it started in.
    first: Option<WindowStart>,
    /// Ids it answered `ok`: kept after it dies, for the invariants only.
    accepted: Ids,
    /// Ids Redis took in its rounds.
    delivered: Ids,
    rounds: u8,
    /// Admission is open: a heartbeat was answered, and its lease has not ended.
    lease: bool,
    /// Redis lost its data since its lease was last renewed: within a lease term
    /// it heartbeats again or its lease ends, so no time passes until it does.
    stale: bool,
    epoch: Option<Epoch>,
    /// Runs seen live at its heartbeats.
    seen: Runs,
    /// Runs remembered at a loss, with the window it was noticed in.
    remembered: [Option<WindowStart>; RUNS],
    /// Less than a heartbeat lifetime since it noticed a loss.
    uncertain: bool,
    /// The window, closed and followed (`tracked`, or `finished` once complete).
    tracked: Option<View>,
    finished: bool,
    task: Task,
}

impl Local {
    fn started(first: WindowStart) -> Local {
        Local {
            life: Life::Alive,
            first: Some(first),
            ..Local::default()
        }
    }

    fn alive(&self) -> bool {
        self.life == Life::Alive
    }

    fn pending(&self) -> Ids {
        self.accepted & !self.delivered
    }

    /// `Fleet::lost_data`: every run seen live is remembered, and for a heartbeat
    /// lifetime waited for.
    fn lost_data(&mut self, now: Phase) {
        for run in runs_in(self.seen) {
            self.remembered[run].get_or_insert(now.window());
        }
        self.uncertain = true;
    }

    /// `Forwarder::force`: once the wait is over.
    fn force(now: Phase) -> Force {
        match now == Phase::WaitOver {
            true => Force::Yes,
            false => Force::No,
        }
    }

    /// `Forwarder::force_now`, at each `settle.lua`: not by force while a loss
    /// was noticed lately and no record of the window is known.
    fn force_now(&self, force: Force, view: &View) -> Force {
        match force {
            Force::Yes if view.known.is_none() && self.uncertain => Force::No,
            force => force,
        }
    }
}

/// A record some settle published (ghost state, for I3 and I4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Publication {
    record: Record,
    /// Redis lost its data since.
    lost_since: bool,
}

/// How far the search goes.
#[derive(Debug, Clone, Copy)]
pub(super) struct Bounds {
    pub instances: usize,
    pub ids: u8,
    /// Restarts of each instance.
    pub restarts: usize,
    /// Times Redis loses its data.
    pub losses: u8,
    /// Steps, at most.
    pub depth: usize,
    /// Check I5 from every state found (costly: a whole settling each).
    pub finality: bool,
}

/// A step: of time, of a run (its process or its link), or of Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Time moves to the next phase.
    Advance,
    Accept(Run, u8),
    Deliver(Run),
    Heartbeat(Run),
    /// Its heartbeat expires (cut off, or dead): its lease ended before.
    Lapse(Run),
    Close(Run),
    Check(Run),
    Survey(Run),
    Settle(Run),
    /// A heartbeat lifetime since it noticed a loss.
    Calm(Run),
    Die(Run),
    /// The next run of the instance starts (its slot).
    Restart(Run),
    Flush,
}

/// The window's world: the time, Redis, every run, and the ghost state the
/// invariants read (what was lost, what was published).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct State {
    instances: u8,
    phase: Phase,
    redis: Redis,
    runs: Vec<Local>,
    /// Epochs set so far (the next tag).
    epochs: u8,
    losses: u8,
    /// Ids answered `ok` before a loss.
    lost: Ids,
    published: Vec<Publication>,
}

impl State {
    /// Every instance's first run started before the window, not registered yet.
    fn new(bounds: &Bounds) -> State {
        let slots = bounds.instances * (1 + bounds.restarts);
        assert!(slots <= RUNS, "at most {RUNS} runs");
        let mut runs = vec![Local::default(); slots];
        for run in runs.iter_mut().take(bounds.instances) {
            *run = Local::started(Phase::Early.window());
        }
        State {
            instances: bounds.instances as u8,
            phase: Phase::Early,
            redis: Redis::default(),
            runs,
            epochs: 0,
            losses: 0,
            lost: 0,
            published: Vec::new(),
        }
    }

    /// Ids answered `ok` by any run.
    fn truth(&self) -> Ids {
        self.runs.iter().fold(0, |ids, run| ids | run.accepted)
    }

    /// Ids some live run answered `ok` (and so can send again).
    fn held_by_the_living(&self) -> Ids {
        let living = self.runs.iter().filter(|run| run.alive());
        living.fold(0, |ids, run| ids | run.accepted)
    }

    /// Every step that may come next.
    fn actions(&self, bounds: &Bounds) -> Vec<Action> {
        let mut actions = Vec::new();
        let stale = self.runs.iter().any(|run| run.stale);
        if self.phase.next().is_some() && !stale {
            actions.push(Action::Advance);
        }
        for (r, run) in self.runs.iter().enumerate() {
            if run.alive() {
                if run.lease && self.phase == Phase::During {
                    let ids = (0..bounds.ids).filter(|id| run.accepted & (1 << id) == 0);
                    actions.extend(ids.map(|id| Action::Accept(r, id)));
                }
                match &run.task {
                    Task::Idle => {
                        if run.pending() != 0 {
                            actions.push(Action::Deliver(r));
                        }
                        actions.push(Action::Heartbeat(r));
                        if self.may_close(r) {
                            actions.push(Action::Close(r));
                        }
                        if run.tracked.is_some() && !run.finished {
                            actions.push(Action::Check(r));
                        }
                    }
                    Task::Survey(..) => actions.push(Action::Survey(r)),
                    Task::Settle(..) => actions.push(Action::Settle(r)),
                }
                if run.uncertain && !stale {
                    actions.push(Action::Calm(r));
                }
                actions.push(Action::Die(r));
            } else if run.life == Life::Unstarted
                && self.runs[r - bounds.instances].life == Life::Dead
            {
                actions.push(Action::Restart(r));
            }
            if self.redis.registry[r].is_some_and(|e| e.expiry == Expiry::Live) || run.lease {
                actions.push(Action::Lapse(r));
            }
        }
        if self.losses < bounds.losses {
            actions.push(Action::Flush);
        }
        actions
    }

    /// The aggregator closes every window from the run's first on, once it ended;
    /// the close comes through the queue after the window's last ids.
    fn may_close(&self, r: Run) -> bool {
        let run = &self.runs[r];
        run.first.is_some_and(|first| first <= WINDOW)
            && self.phase >= Phase::After
            && run.pending() == 0
            && run.tracked.is_none()
    }

    fn apply(&mut self, action: Action) -> Result<(), String> {
        let now = self.phase;
        match action {
            Action::Advance => {
                self.phase = now.next().expect("offered only before the last");
                if now == Phase::Early {
                    // A lease renewed and a heartbeat sent in it end before the next.
                    for (r, run) in self.runs.iter_mut().enumerate() {
                        run.lease = false;
                        run.stale = false;
                        if let Some(entry) = self.redis.registry[r].as_mut() {
                            entry.expiry = Expiry::LapsedIn(Phase::Early);
                        }
                    }
                }
            }
            Action::Accept(r, id) => self.runs[r].accepted |= 1 << id,
            Action::Deliver(r) => {
                let run = &mut self.runs[r];
                let (ids, round) = (run.pending(), run.rounds + 1);
                round_multi(&mut self.redis, r, ids, round, false, round == 1);
                run.delivered |= ids;
                run.rounds = round;
            }
            Action::Heartbeat(r) => {
                // `Forwarder::heartbeat`: a window left unfinished is adopted by a
                // run with no part in it once its wait is over.
                let listed = self.beat(r);
                let run = &mut self.runs[r];
                let ours = run.delivered != 0 || run.tracked.is_some();
                if listed && rules::adopts(ours, now == Phase::WaitOver) {
                    run.task = Task::Survey(Job::Adopt(View::default()), Force::Yes);
                }
            }
            Action::Lapse(r) => {
                if let Some(entry) = self.redis.registry[r].as_mut() {
                    entry.expiry = Expiry::LapsedIn(now);
                }
                self.runs[r].lease = false;
                self.runs[r].stale = false;
            }
            Action::Close(r) => {
                let run = &mut self.runs[r];
                let view = View {
                    coverage: Some(match run.first == Some(WINDOW) {
                        true => Mark::Partial,
                        false => Mark::Full,
                    }),
                    delivered: ids_in(run.delivered),
                    ..View::default()
                };
                run.task = Task::Survey(Job::Close, Local::force(now));
                run.tracked = Some(view);
            }
            Action::Check(r) => {
                let run = &mut self.runs[r];
                run.task = Task::Survey(Job::Check, Local::force(now));
            }
            Action::Survey(r) => self.survey_step(r),
            Action::Settle(r) => return self.settle_step(r),
            Action::Calm(r) => self.runs[r].uncertain = false,
            Action::Die(r) => {
                // Only what it answered stays, for the invariants.
                let accepted = self.runs[r].accepted;
                self.runs[r] = Local {
                    life: Life::Dead,
                    accepted,
                    ..Local::default()
                };
            }
            Action::Restart(r) => {
                self.runs[r] = Local::started(now.window());
            }
            Action::Flush => {
                self.redis = Redis {
                    clock: self.redis.clock,
                    ..Redis::default()
                };
                self.losses += 1;
                self.lost |= self.truth();
                for run in &mut self.runs {
                    run.stale = run.lease;
                }
                for publication in &mut self.published {
                    publication.lost_since = true;
                }
            }
        }
        Ok(())
    }

    /// `Fleet::heartbeat`: registers, learns the epoch (a new one: Redis lost its
    /// data), sees who is live, renews the lease. Returns whether the window is
    /// listed as unfinished.
    fn beat(&mut self, r: Run) -> bool {
        let run = &self.runs[r];
        let knows = run.epoch.map(Epoch::text);
        let next = rules::next_epoch(knows.as_deref(), &self.epochs.to_string());
        let first = run.first.expect("a started run");
        let before = self.redis.epoch;
        let now = self.phase;
        let (epoch, live, listed) =
            heartbeat_lua(&mut self.redis, r, first, run.epoch, (&next, now));
        if self.redis.epoch != before {
            self.epochs += 1;
        }
        let run = &mut self.runs[r];
        // `Fleet::learn_epoch`
        if run.epoch.is_some_and(|known| known != epoch) {
            run.lost_data(now);
        }
        run.epoch = Some(epoch);
        run.seen |= live;
        run.lease = true;
        run.stale = false;
        listed
    }

    /// The view the run's job settles with.
    fn view(&mut self, r: Run) -> &mut View {
        let run = &mut self.runs[r];
        match &mut run.task {
            Task::Survey(Job::Adopt(view), _) | Task::Settle(Job::Adopt(view), ..) => view,
            _ => run.tracked.as_mut().expect("a closed window"),
        }
    }

    /// The first half of `Forwarder::settle`'s loop: a survey, and a heartbeat if
    /// the epoch changed, or a replay if Redis counts fewer of this run's ids than
    /// it delivered; else the settle is next.
    fn survey_step(&mut self, r: Run) {
        let found = survey(&self.redis, r, self.phase);
        // `Fleet::knows_epoch`: a run that knows none beats too.
        if self.runs[r].epoch.is_none() || self.runs[r].epoch != found.epoch {
            self.beat(r);
            return;
        }
        if found.mine < self.view(r).delivered {
            // `Forwarder::replay`: `sending` again, then every id again, counted
            // afresh.
            let now = self.phase;
            let run = &mut self.runs[r];
            run.lost_data(now);
            let round = run.rounds + 1;
            round_multi(&mut self.redis, r, run.accepted, round, true, true);
            run.rounds = round;
            return;
        }
        let Task::Survey(job, force) = self.runs[r].task else {
            unreachable!("a survey step")
        };
        self.runs[r].task = Task::Settle(job, force, found);
    }

    /// The second half: `Fleet::settle` builds the arguments (who is awaited, by
    /// `rules`), runs `settle.lua`, and the run learns what it answered.
    fn settle_step(&mut self, r: Run) -> Result<(), String> {
        let Task::Settle(job, force, found) = self.runs[r].task else {
            unreachable!("a settle step")
        };
        let names: Vec<String> = (0..self.runs.len()).map(|r| self.name(r)).collect();
        let slot = |name: &str| names.iter().position(|n| n == name).expect("a run");
        let registry: Vec<Registered> = found
            .registry
            .iter()
            .enumerate()
            .filter_map(|(r, entry)| {
                entry.map(|e| Registered {
                    run: names[r].clone(),
                    first: e.first,
                    expires_ms: e.expiry.ms(found.now),
                })
            })
            .collect();
        let run = &self.runs[r];
        let remembered: Vec<Remembered> = run
            .remembered
            .iter()
            .enumerate()
            .filter_map(|(r, noticed)| {
                noticed.map(|noticed_in| Remembered {
                    run: names[r].clone(),
                    noticed_in,
                })
            })
            .collect();
        let mut more: Runs = match run.uncertain {
            true => remembered
                .iter()
                .fold(0, |runs, m| runs | 1 << slot(&m.run)),
            false => rules::lost_with_data(&remembered, &registry, WINDOW)
                .into_iter()
                .fold(0, |runs, name| runs | 1 << slot(name)),
        };
        let view = *self.view(r);
        let forced = self.runs[r].force_now(force, &view);
        more |= view.members | found.delivered_by;
        let (live, lapsed) = rules::awaited(&registry, WINDOW, found.now.now_ms());
        more |= lapsed
            .into_iter()
            .fold(0, |runs, name| runs | 1 << slot(name));
        let live = live
            .into_iter()
            .fold(0, |runs, name| runs | 1 << slot(name));
        // `roster.lua` answers '' for no epoch.
        let epoch = found.epoch.map_or(String::new(), Epoch::text);
        let began_ms = rules::epoch_began_ms(&epoch);
        let wait = std::time::Duration::from_millis(WAIT_MS);
        let answer = settle_lua(
            &mut self.redis,
            &SettleCall {
                me: r,
                mark: view.coverage,
                force: forced,
                generation: view.generation,
                count: found.count,
                counted: found.counted,
                known: view.known,
                first_revision: rules::first_revision(WINDOW, began_ms),
                never_complete: !rules::may_be_complete(WINDOW, began_ms, wait),
                live,
                more,
            },
        );
        if answer.release {
            self.redis.orphans = false;
        }
        if answer.outcome == Outcome::Published {
            self.published(answer.record.expect("just published"))?;
        }
        self.view(r).generation = Some(answer.generation);
        if answer.outcome == Outcome::Again {
            let job = match job {
                Job::Adopt(_) => Job::Adopt(*self.view(r)),
                job => job,
            };
            self.runs[r].task = Task::Survey(job, force);
            return Ok(());
        }
        let run = &mut self.runs[r];
        run.task = Task::Idle;
        if job == Job::Close || job == Job::Check {
            // `Forwarder::learn`, then `follow` (finished once complete: no
            // shared sinks whose acknowledgement it would wait for).
            let tracked = run.tracked.as_mut().expect("a closed window");
            tracked.members |= answer.members;
            if let Some(record) = answer.record {
                if tracked
                    .known
                    .map_or(true, |known| known.revision < record.revision)
                {
                    tracked.known = Some(record);
                }
            }
            run.finished = tracked.known.is_some_and(|known| known.complete);
        }
        Ok(())
    }

    /// I1-I4, as a settle publishes `record`.
    fn published(&mut self, record: Record) -> Result<(), String> {
        let truth = self.truth();
        if record.count > ids_in(truth) {
            return Err(format!(
                "I1: {record:?} counts more than the {} ids answered ok",
                ids_in(truth)
            ));
        }
        let missing = truth & !(self.lost & !self.held_by_the_living()) & !record.counted;
        if record.complete && missing != 0 {
            return Err(format!(
                "I2: {record:?} is complete without ids {missing:#b}"
            ));
        }
        for earlier in &self.published {
            let before = earlier.record;
            if before.revision == record.revision && before.content() != record.content() {
                return Err(format!(
                    "I3: revision {} was {before:?}, now {record:?}",
                    record.revision
                ));
            }
            if before.revision >= record.revision {
                return Err(format!(
                    "I4: revision {} published after {before:?}",
                    record.revision
                ));
            }
            if record.count < before.count && !earlier.lost_since {
                return Err(format!(
                    "I4: {record:?} counts less than {before:?}, with no loss since"
                ));
            }
        }
        self.published.push(Publication {
            record,
            lost_since: false,
        });
        Ok(())
    }

    fn name(&self, r: Run) -> String {
        name_of(r, usize::from(self.instances))
    }
}

impl State {
    /// I5: from here, with no more faults, every live run ends what it was doing,
    /// time runs past the fleet's wait, the dead lapse, and every live run, in
    /// turn and a few times over, heartbeats (adopting what is listed), delivers,
    /// closes and checks.
    /// Then the window must have been published if a live run holds an id of it
    /// or Redis does (once, at least: a record published before Redis lost it is
    /// out, in the sinks).
    fn settles(&self) -> Result<(), (String, Vec<Action>)> {
        let mut state = self.clone();
        let mut steps = Vec::new();
        let mut step = |state: &mut State, action| {
            steps.push(action);
            state.apply(action)
        };
        let drained = (|| {
            // Each run ends what it was doing first: it heartbeats within a lease
            // term of a loss (`Local::stale`), so time may not pass before.
            for r in 0..state.runs.len() {
                if state.runs[r].alive() {
                    state.finish(r, &mut step)?;
                    if state.runs[r].stale {
                        step(&mut state, Action::Heartbeat(r))?;
                        state.finish(r, &mut step)?;
                    }
                }
            }
            while state.phase.next().is_some() {
                step(&mut state, Action::Advance)?;
            }
            for r in 0..state.runs.len() {
                let dead = state.runs[r].life == Life::Dead;
                if dead && state.redis.registry[r].is_some_and(|e| e.expiry == Expiry::Live) {
                    step(&mut state, Action::Lapse(r))?;
                }
            }
            let living: Vec<Run> = (0..state.runs.len())
                .filter(|&r| state.runs[r].alive())
                .collect();
            for _ in 0..3 {
                for &r in &living {
                    if state.runs[r].uncertain {
                        step(&mut state, Action::Calm(r))?;
                    }
                    state.finish(r, &mut step)?;
                    step(&mut state, Action::Heartbeat(r))?;
                    state.finish(r, &mut step)?;
                    if state.runs[r].pending() != 0 {
                        step(&mut state, Action::Deliver(r))?;
                    }
                    if state.may_close(r) {
                        step(&mut state, Action::Close(r))?;
                        state.finish(r, &mut step)?;
                    }
                    if state.runs[r].tracked.is_some() && !state.runs[r].finished {
                        step(&mut state, Action::Check(r))?;
                        state.finish(r, &mut step)?;
                    }
                }
            }
            let held = state.held_by_the_living() | state.redis.ids;
            if !living.is_empty() && held != 0 && state.published.is_empty() {
                return Err(format!(
                    "I5: never published, with ids {held:#b} held, once every live run settled"
                ));
            }
            Ok(())
        })();
        drained.map_err(|violation| (violation, steps))
    }

    /// Takes the run's settle to its end, each step through `step`.
    fn finish(
        &mut self,
        r: Run,
        step: &mut impl FnMut(&mut State, Action) -> Result<(), String>,
    ) -> Result<(), String> {
        for _ in 0..32 {
            match self.runs[r].task {
                Task::Idle => return Ok(()),
                Task::Survey(..) => step(self, Action::Survey(r))?,
                Task::Settle(..) => step(self, Action::Settle(r))?,
            }
        }
        Err(format!("{} never ends its settle", self.name(r)))
    }

    fn describe(&self, action: Action) -> String {
        let name = |r| self.name(r);
        match action {
            Action::Advance => format!("time: {:?}", self.phase.next().expect("offered")),
            Action::Accept(r, id) => format!("{} answers id {id} ok", name(r)),
            Action::Deliver(r) => format!("{} delivers a round", name(r)),
            Action::Heartbeat(r) => format!("{} heartbeats", name(r)),
            Action::Lapse(r) => format!("{}'s heartbeat lapses", name(r)),
            Action::Close(r) => format!("{} closes the window", name(r)),
            Action::Check(r) => format!("{} checks the window", name(r)),
            Action::Survey(r) => format!("{} surveys", name(r)),
            Action::Settle(r) => format!("{} runs settle.lua", name(r)),
            Action::Calm(r) => format!("{}'s uncertainty ends", name(r)),
            Action::Die(r) => format!("{} is killed", name(r)),
            Action::Restart(r) => format!("{} starts", name(r)),
            Action::Flush => "Redis loses everything".to_owned(),
        }
    }

    /// One line of what matters after a step.
    fn summary(&self) -> String {
        let redis = &self.redis;
        let mut line = format!("  [redis ids {:#b} gen {}", redis.ids, redis.generation);
        for (r, mark) in redis.marks.iter().enumerate() {
            if let Some(mark) = mark {
                let _ = write!(line, " {}:{mark:?}", self.name(r));
            }
        }
        if let Some(record) = redis.record {
            let _ = write!(
                line,
                " record r{} n{} complete={}",
                record.revision, record.count, record.complete
            );
        }
        if let Some(epoch) = redis.epoch {
            let _ = write!(line, " epoch {}", epoch.text());
        }
        line.push(']');
        line
    }
}

/// A violation, with the shortest sequence of steps that leads to it.
pub(super) struct Counterexample {
    pub violation: String,
    pub trace: String,
}

/// What a search covered.
#[derive(Debug)]
pub(super) struct Explored {
    pub states: usize,
    pub deepest: usize,
}

/// Breadth first over every state within `bounds`: the first violation found has a
/// shortest trace.
pub(super) fn explore(bounds: &Bounds) -> Result<Explored, Box<Counterexample>> {
    let start = State::new(bounds);
    let mut index: HashMap<State, u32> = HashMap::from([(start.clone(), 0)]);
    // Per state: the state it was first reached from, and the step.
    let mut parents: Vec<(u32, Option<Action>)> = vec![(0, None)];
    let mut queue = VecDeque::from([(start.clone(), 0u32, 0usize)]);
    let mut deepest = 0;
    // The steps to `at`, then `then`.
    let fail = |parents: &[(u32, Option<Action>)], at: u32, then: &[Action], violation| {
        let mut steps = Vec::new();
        let mut at = at;
        while let (parent, Some(action)) = parents[at as usize] {
            steps.push(action);
            at = parent;
        }
        steps.reverse();
        steps.extend_from_slice(then);
        Box::new(Counterexample {
            violation,
            trace: trace(&start, &steps),
        })
    };
    while let Some((state, at, depth)) = queue.pop_front() {
        deepest = deepest.max(depth);
        if depth == bounds.depth {
            continue;
        }
        for action in state.actions(bounds) {
            let mut next = state.clone();
            if let Err(violation) = next.apply(action) {
                return Err(fail(&parents, at, &[action], violation));
            }
            if index.contains_key(&next) {
                continue;
            }
            let id = parents.len() as u32;
            parents.push((at, Some(action)));
            if bounds.finality {
                if let Err((violation, then)) = next.settles() {
                    let violation = format!(
                        "{violation} (the fault-free ending from step {})",
                        depth + 2
                    );
                    return Err(fail(&parents, id, &then, violation));
                }
            }
            index.insert(next.clone(), id);
            queue.push_back((next, id, depth + 1));
        }
    }
    Ok(Explored {
        states: index.len(),
        deepest,
    })
}

/// Run `r`'s name: its instance's letter, and which of its runs it is.
fn name_of(r: Run, instances: usize) -> String {
    let instance = char::from(b'a' + (r % instances) as u8);
    format!("{instance}{}", r / instances + 1)
}

/// The steps from `start`, one a line, each with Redis's state after it.
fn trace(start: &State, steps: &[Action]) -> String {
    let mut state = start.clone();
    let mut text = String::new();
    for (n, &action) in steps.iter().enumerate() {
        let _ = write!(text, "{:>3}. {}", n + 1, state.describe(action));
        let outcome = state.apply(action);
        let _ = writeln!(text, "{}", state.summary());
        if let Err(violation) = outcome {
            let _ = writeln!(text, "     -> {violation}");
        }
    }
    text
}

#[cfg(test)]
mod differential;
#[cfg(test)]
mod tests;
