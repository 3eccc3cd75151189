//! The fleet protocol's decisions, as plain functions of what Redis answered,
//! what this run holds and the time: no Redis, no clock, so that each rule is a
//! unit test. The forwarder and `fleet` are the shell that asks Redis, runs the
//! Lua scripts (the atomic steps) and applies what these return.

use std::time::Duration;

use crate::window::{WindowLength, WindowStart};

/// A run in the registry, as `roster.lua` read it: live, or lapsed (its
/// heartbeat expired) but kept for as long as a window it was live in may still
/// be settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Registered {
    pub run: String,
    /// The window the run started in: it has no ids for earlier ones.
    pub first: WindowStart,
    /// When its heartbeat expires (or expired), ms since the epoch, by Redis's clock.
    pub expires_ms: u64,
}

impl Registered {
    /// Whether the run's heartbeat is current at `now_ms` (Redis's clock).
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.expires_ms >= now_ms
    }

    /// Whether the run may hold ids for `window`, and so must be done with it
    /// before its record may say `complete=true`: it joined by the window's end
    /// (its first window is not later) and was live when the window began or at
    /// some time after, whether or not its heartbeat lapsed since. A lapse after
    /// a long stall is exactly when its ids are missing. A run that left is not
    /// in the registry at all.
    pub fn may_have_ids(&self, window: WindowStart, now_ms: u64) -> bool {
        self.first <= window
            && (self.is_live(now_ms) || self.expires_ms > window.unix_secs() * 1000)
    }
}

/// Who `settle.lua` waits for on `window`, from the registry: the live runs that
/// may have ids for it (they also stop a leaving run from publishing alone), and
/// the lapsed ones that may (they only make the record `complete=false`).
pub(super) fn awaited(
    registry: &[Registered],
    window: WindowStart,
    now_ms: u64,
) -> (Vec<&str>, Vec<&str>) {
    let (live, lapsed): (Vec<&Registered>, Vec<&Registered>) = registry
        .iter()
        .filter(|r| r.may_have_ids(window, now_ms))
        .partition(|r| r.is_live(now_ms));
    (names(live), names(lapsed))
}

fn names(runs: Vec<&Registered>) -> Vec<&str> {
    runs.into_iter().map(|r| r.run.as_str()).collect()
}

/// A run this run saw live shortly before it noticed that Redis lost its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Remembered {
    pub run: String,
    /// The window in which the loss was noticed: it and every earlier one began
    /// before the loss was over.
    pub noticed_in: WindowStart,
}

/// The runs seen live before a loss of Redis's data that a settle of `window`
/// waits for beyond the registry, once the first heartbeat lifetime after the
/// loss is over: those remembered from a loss noticed in `window` or later (the
/// window began before it, so they may have had ids for it that Redis lost) that
/// have not registered again since. A run that did is in the registry, sends
/// its ids again and marks itself done, and is waited for like any run; one
/// killed around the loss never does, and the window is published
/// `complete=false`: the ids only it had are gone.
pub(super) fn lost_with_data<'a>(
    remembered: &'a [Remembered],
    registry: &[Registered],
    window: WindowStart,
) -> Vec<&'a str> {
    remembered
        .iter()
        .filter(|r| window <= r.noticed_in && !registry.iter().any(|known| known.run == r.run))
        .map(|r| r.run.as_str())
        .collect()
}

/// Whether this run adopts a window listed among the fleet's unfinished ones at a
/// heartbeat: one it has no part in (it neither follows nor sends to it, nor saw
/// it finished), once the fleet's wait for it is over. The list holds every
/// window some run sent ids to until it is settled complete or adopted, so a
/// window whose every run was killed is still published.
pub(super) fn adopts(ours: bool, wait_over: bool) -> bool {
    !ours && wait_over
}

/// Whether the fleet's wait for `window` (`length` long) is over at `now_ms`
/// (ms since the epoch): `wait` (`VERVE_FLEET_WAIT_MS`) after its end. From then
/// on a settle publishes whatever is there, and an unfinished window may be
/// adopted.
pub(super) fn is_wait_over(
    window: WindowStart,
    length: WindowLength,
    wait: Duration,
    now_ms: u64,
) -> bool {
    let end = length.next(window).unix_secs();
    now_ms >= end * 1000 + wait.as_millis() as u64
}

/// The shards of a window to send again because Redis lost some of this run's
/// ids: those whose sentinel counts fewer of them (`counted`, per sentinel, as a
/// survey read it; one missing counts none) than this run delivered to the
/// shards it counts (`delivered`, per shard). Each of the `shards` shards is
/// counted by sentinel `sentinel_of(shard)`, one of `sentinels`: its own on a
/// cluster (a failover rolls back one master's shards), one for all on a single
/// server (it loses or keeps them together, so all are sent again).
pub(super) fn short_shards(
    delivered: &[u64],
    counted: &[u64],
    shards: usize,
    sentinels: usize,
    sentinel_of: impl Fn(usize) -> usize,
) -> Vec<usize> {
    let mut sent = vec![0; sentinels];
    for (shard, &ids) in delivered.iter().enumerate() {
        sent[sentinel_of(shard)] += ids;
    }
    let counted = |sentinel: usize| counted.get(sentinel).copied().unwrap_or(0);
    (0..shards)
        .filter(|&shard| {
            let sentinel = sentinel_of(shard);
            counted(sentinel) < sent[sentinel]
        })
        .collect()
}

/// What a run must share with the fleet to write to its sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Layout {
    /// `VERVE_REDIS_SHARDS`: shards per window.
    pub shards: usize,
    /// `VERVE_WINDOW_SECS`.
    pub window_secs: u64,
    /// Each shard is split over as many sets as its sentinel says (this
    /// version); a fleet of an earlier version writes one set per shard, which
    /// this version would never count.
    pub sets_per_window: bool,
}

/// The suffix of the registry's shard count from versions that split each
/// shard over sets counted per window: an earlier version compares the whole
/// value with its own count and refuses itself.
const SETS_PER_WINDOW: &str = "+sets";

impl Layout {
    /// How the registry keeps the shard count (`P:{fleet}:shards`).
    pub fn registered_shards(&self) -> String {
        format!("{}{SETS_PER_WINDOW}", self.shards)
    }

    /// The fleet's layout from the registry's shard count and window length.
    pub fn of_fleet(shards: &str, window_secs: u64) -> Self {
        let (count, sets_per_window) = match shards.strip_suffix(SETS_PER_WINDOW) {
            Some(count) => (count, true),
            None => (shards, false),
        };
        Layout {
            shards: count.parse().unwrap_or(0),
            window_secs,
            sets_per_window,
        }
    }
}

/// Why a run laid out as `here` must not deliver to a fleet laid out as `fleet`
/// (under `prefix`), if it must not: one line, naming the setting to change.
/// Another split would count some ids twice; another window length would put
/// ids of one window into another's set.
pub(super) fn refusal(here: Layout, fleet: Layout, prefix: &str) -> Option<String> {
    if here.sets_per_window != fleet.sets_per_window {
        return Some(format!(
            "the fleet sharing this Redis (prefix {prefix}) runs a verve that writes one set \
             per shard, and this one splits shards over sets counted per window: the two would \
             not count each other's ids; stop that fleet before starting this version (or use \
             another VERVE_REDIS_PREFIX)"
        ));
    }
    if here.shards != fleet.shards {
        return Some(format!(
            "VERVE_REDIS_SHARDS is {} here but {} in the fleet sharing this Redis \
             (prefix {prefix}): every instance must split windows the same way, or ids would \
             be counted twice; set it to {}",
            here.shards, fleet.shards, fleet.shards
        ));
    }
    if here.window_secs != fleet.window_secs {
        return Some(format!(
            "VERVE_WINDOW_SECS is {} here but {} in the fleet sharing this Redis \
             (prefix {prefix}): every instance must count the same windows, or one window's \
             set would take in another's ids; set it to {} (or use another VERVE_REDIS_PREFIX)",
            here.window_secs, fleet.window_secs, fleet.window_secs
        ));
    }
    None
}

/// A window's sets, together, are at most this many: a round of
/// `ROUND_IDS` (65,536) ids then still carries 4 per set, and a survey (the sum
/// of every set's size, in Lua) stays within a few ms of Redis's time. With
/// `set-max-intset-entries` at 8192, a window is compact up to 134 M ids.
const MOST_SETS_PER_WINDOW: u32 = 16_384;

/// A run projects its rate over at most this much of a window: a window of an
/// hour or a day learns its size from the one before it instead, rather than
/// from the first second's rate (every id new then), which would split it far
/// finer than its ids fill.
const PROJECTED_OVER: Duration = Duration::from_secs(60);

/// The ids a set is aimed at holding, at most: an intset's insert moves half
/// of it, so past a few thousand ids that costs more than a command per set
/// per round saves (docs/performance.md, "Redis's cost per id").
const MOST_IDS_PER_SET: u64 = 2_048;

/// How many sets each of `shards` shards of a window expected to hold
/// `expected_ids` is split into, for Redis that keeps sets of up to
/// `intset_limit` integers compact (`set-max-intset-entries`): a power of two
/// that leaves each set half that, or [`MOST_IDS_PER_SET`], so that a window
/// twice as busy as expected stays compact; one set for a quiet window, or
/// when Redis keeps no set of more than [`LEAST_INTSET_LIMIT`] compact.
pub(super) fn sets_per_shard(expected_ids: u64, shards: usize, intset_limit: u64) -> u32 {
    if intset_limit < LEAST_INTSET_LIMIT {
        return 1;
    }
    let per_set = (intset_limit / 2).min(MOST_IDS_PER_SET);
    let shards = shards.max(1) as u64;
    let most = (u64::from(MOST_SETS_PER_WINDOW) / shards).max(1);
    let most = 1 << most.ilog2();
    let needed = expected_ids.div_ceil(shards * per_set);
    needed
        .checked_next_power_of_two()
        .map_or(most, |sets| sets.min(most)) as u32
}

/// Below this `set-max-intset-entries`, splitting a shard would make sets so
/// small that a command per set per round costs more than compact sets save.
const LEAST_INTSET_LIMIT: u64 = 64;

/// The ids a run expects in a window it is about to send its first round to:
/// the count of the latest window the fleet published, or what its own
/// rate (`ids` new to it queued over `queued_for`) makes over the `window`
/// (over [`PROJECTED_OVER`] at most), times the runs sharing the traffic,
/// whichever is more.
pub(super) fn expected_ids(
    latest_count: u64,
    ids: usize,
    queued_for: Duration,
    window: Duration,
    live_runs: usize,
) -> u64 {
    let queued_for = queued_for.max(Duration::from_millis(1));
    let rate = ids as f64 / queued_for.as_secs_f64();
    let over = window.min(PROJECTED_OVER).as_secs_f64();
    let projected = rate * over * live_runs.max(1) as f64;
    latest_count.max(projected as u64)
}

/// What a survey costs Redis per set it reads, about (`tally.lua`'s `EXPIRE`
/// and `SCARD` from Lua: 42 to 45 ms for 16,384 sets, docs/performance.md).
const SURVEY_PER_SET: Duration = Duration::from_micros(3);

/// How often a run checks a window of `sets` sets the fleet has not finished:
/// every `poll`, or so that its surveys take at most 2.5 % of Redis's time
/// (40 times a survey's cost: 2 s for 16,384 sets), whichever is longer.
pub(super) fn poll_interval(poll: Duration, sets: u64) -> Duration {
    poll.max(SURVEY_PER_SET * 40 * sets.min(u64::from(u32::MAX)) as u32)
}

/// How long ids may wait in the queue for more to join their round: 1/128 of
/// a window (a few ms to half a second), so that a round carries, per set,
/// about as many ids as a set holds over 128 (a window's ids are spread over
/// sets of [`MOST_IDS_PER_SET`]) whatever the rate, rather than one command
/// per id at low rates.
pub(super) fn round_wait(length: WindowLength) -> Duration {
    (Duration::from_secs(length.as_secs()) / 128)
        .clamp(Duration::from_millis(1), Duration::from_millis(500))
}

/// How far Redis's clock (`redis_us`, read by a heartbeat) is ahead of this
/// host's, in ms: against the middle of the call, sent at `sent_us` and answered
/// at `received_us` by this host's clock (both us since the epoch). Negative:
/// this host is ahead.
pub(super) fn clock_offset_ms(sent_us: u64, received_us: u64, redis_us: u64) -> i64 {
    let middle = sent_us / 2 + received_us / 2;
    (redis_us as i64 - middle as i64) / 1000
}

/// The number of the fleet's epoch `epoch` (`<number>:<tag>:<began>`, as
/// `heartbeat.lua` keeps it); 0 for an epoch without one (written by a version
/// before epochs were numbered).
pub(super) fn epoch_number(epoch: &str) -> u64 {
    epoch
        .split_once(':')
        .and_then(|(number, _)| number.parse().ok())
        .unwrap_or(0)
}

/// When the fleet's epoch `epoch` began, in ms since the Unix epoch by Redis's
/// clock (its last field, which `heartbeat.lua` appends); `None` for an epoch
/// written by a version before it did.
pub(super) fn epoch_began_ms(epoch: &str) -> Option<u64> {
    let (numbered, began) = epoch.rsplit_once(':')?;
    numbered.contains(':').then(|| began.parse().ok())?
}

/// Whether the record of `window` may say `complete=true` under an epoch that
/// began at `began_ms` (`None`: long ago): not if the window began within a
/// fleet `wait` of it. An epoch begins when Redis lost its data (or the fleet
/// its first day), and with the data went the heartbeats of every run live
/// then; a run cut off since may hold ids nobody can know of, but its lease
/// ended before its heartbeat would have expired, a `wait` after the loss at
/// most. So only a window that began later has every run that answered `ok` in
/// it in the registry. The price: a fleet's first window, and each window
/// around a loss, is published `complete=false`, its count exact if every
/// holder sent its ids.
pub(super) fn may_be_complete(window: WindowStart, began_ms: Option<u64>, wait: Duration) -> bool {
    began_ms.map_or(true, |began| {
        window.unix_secs() * 1000 >= began + wait.as_millis() as u64
    })
}

/// The epoch a heartbeat sets if Redis holds none, or an earlier one than this
/// run `knows`: numbered one past it (0 if this run knows none), tagged `tag`
/// (distinct each time, so that every run tells one setting from another).
pub(super) fn next_epoch(knows: Option<&str>, tag: &str) -> String {
    let number = knows.map_or(0, |epoch| epoch_number(epoch) + 1);
    format!("{number}:{tag}")
}

/// How many bits of a revision count revisions within one epoch: 2^20 of them
/// per window and epoch, far more than settles publish.
const REVISION_BITS: u32 = 20;

/// The furthest from a window's start, in ms, that an epoch's beginning numbers
/// its revisions (99 days, longer than any record is kept): the revisions
/// stay exact in Lua's numbers (below 2^53).
const LATEST_EPOCH_MS: u64 = (1 << (53 - REVISION_BITS)) - 1;

/// The lowest revision a settle of `window` may publish under an epoch that
/// began at `began_ms` (Redis's clock; `None`, an epoch written by an older
/// version, counts as long ago): 1 if the epoch began before the window (the
/// fleet's start, or a loss before it: no record of the window is older), else
/// the ms from the window's start to the epoch's, × 2^20, + 1. An epoch begins
/// only when Redis lost its data, later by its clock than the epoch before, so a
/// record published after a loss is numbered above every one published before,
/// even when no live run saw the loss or remembered the record (a number
/// counted in Redis would start again). While nothing was lost, revisions are
/// 1, 2, 3, …
pub(super) fn first_revision(window: WindowStart, began_ms: Option<u64>) -> u64 {
    let began = began_ms.map_or(0, |began| began.saturating_sub(window.unix_secs() * 1000));
    (began.min(LATEST_EPOCH_MS) << REVISION_BITS) + 1
}

/// How long after sending a heartbeat that Redis answered this run may answer
/// `ok` ([`super::lease`]). Redis expires the heartbeat `wait` after it ran it,
/// which is after the send; the windows it is compared with are cut by this
/// host's clock, which may be ahead of Redis's. So the term is the wait less a
/// margin for that offset: `max_skew` (past it the instance is unhealthy anyway),
/// but at most a quarter of the wait, so that a healthy run (a heartbeat every
/// quarter wait at most) keeps its lease through one late heartbeat.
pub(super) fn lease_term(wait: Duration, max_skew: Duration) -> Duration {
    wait - max_skew.min(wait / 4)
}

/// A record the shared sinks (Kafka, the Redis stream) may not have taken yet,
/// as a run following its window sees it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Unacknowledged {
    pub revision: u64,
    /// The highest revision the shared sinks acknowledged.
    pub acked: u64,
    /// This run published it.
    pub mine: bool,
    /// The highest revision this run already sent on itself.
    pub resent: u64,
    /// How long its publisher has had to deliver it: since it published, or
    /// since it left (a run that left had its whole shutdown for it).
    pub waited: Duration,
}

impl Unacknowledged {
    /// Whether this run sends the record to the shared sinks itself: they have
    /// not acknowledged it `bound` after its publisher had it, whether the
    /// publisher is still live (it may be cut off from Kafka) or not; never a
    /// record of its own, and once per revision. The topic may then hold the
    /// revision twice, with the same content.
    pub fn resends(&self, bound: Duration) -> bool {
        self.revision > self.acked
            && !self.mine
            && self.revision > self.resent
            && self.waited > bound
    }
}

/// The window to register as this run's first, if closing `closed` when
/// `expected` was the next to close (the run's first window, or the one after the
/// last it closed) shows that windows were skipped: after a forward jump of the
/// clock (or a long freeze), the aggregator skips the windows without ids rather
/// than close them one by one. Windows close in order, so this run has no ids
/// for any window it skipped, and is done with those it closed: from `closed` on,
/// the fleet need not wait for it on earlier windows. It would otherwise wait, up
/// to the fleet wait, on every window the jump skipped.
pub(super) fn first_window_after_skip(
    expected: WindowStart,
    closed: WindowStart,
) -> Option<WindowStart> {
    (closed > expected).then_some(closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: WindowStart = WindowStart::from_unix_secs(600);
    const W_MS: u64 = 600_000;

    fn run(name: &str, first: u64, expires_ms: u64) -> Registered {
        Registered {
            run: name.into(),
            first: WindowStart::from_unix_secs(first),
            expires_ms,
        }
    }

    #[test]
    fn a_run_lost_with_redis_data_holds_back_only_windows_before_the_loss_until_it_is_back() {
        let remembered = [
            Remembered {
                run: "killed".into(),
                noticed_in: W,
            },
            Remembered {
                run: "back".into(),
                noticed_in: W,
            },
        ];
        let registry = [run("back", 0, W_MS + 10_000)];
        let before = WindowStart::from_unix_secs(540);
        let after = WindowStart::from_unix_secs(660);
        assert_eq!(lost_with_data(&remembered, &registry, before), ["killed"]);
        assert_eq!(lost_with_data(&remembered, &registry, W), ["killed"]);
        assert!(lost_with_data(&remembered, &registry, after).is_empty());
        assert!(lost_with_data(&remembered, &[], after).is_empty());
    }

    #[test]
    fn epochs_are_numbered_one_past_the_one_a_run_knows() {
        assert_eq!(next_epoch(None, "a/1-2@3"), "0:a/1-2@3");
        assert_eq!(next_epoch(Some("0:a/1-2@3"), "b@4"), "1:b@4");
        assert_eq!(next_epoch(Some("41:x"), "b@4"), "42:b@4");
        // An epoch of a version before they were numbered counts as 0.
        assert_eq!(epoch_number("a/1-2@3"), 0);
        assert_eq!(next_epoch(Some("a/1-2@3"), "b@4"), "1:b@4");
    }

    #[test]
    fn an_epoch_says_when_it_began_once_redis_appended_it() {
        assert_eq!(
            epoch_began_ms("3:a/1-2@3:1700000000123"),
            Some(1_700_000_000_123)
        );
        assert_eq!(epoch_number("3:a/1-2@3:1700000000123"), 3);
        // Written by a version that did not append it, or not a number.
        assert_eq!(epoch_began_ms("3:a/1-2@3"), None);
        assert_eq!(epoch_began_ms("a/1-2@3"), None);
        assert_eq!(epoch_began_ms("3:a:b"), None);
    }

    #[test]
    fn a_window_beginning_within_a_fleet_wait_of_the_epoch_is_never_complete() {
        let wait = Duration::from_secs(5);
        let window = WindowStart::from_unix_secs(600);
        assert!(!may_be_complete(window, Some(600_000), wait));
        assert!(!may_be_complete(window, Some(595_001), wait));
        assert!(may_be_complete(window, Some(595_000), wait));
        // The epoch began after the window: it spans the loss.
        assert!(!may_be_complete(window, Some(630_000), wait));
        assert!(may_be_complete(window, None, wait));
    }

    #[test]
    fn revisions_of_a_later_epoch_are_above_every_earlier_one() {
        let window = WindowStart::from_unix_secs(600);
        // An epoch that began before the window, or of an older version: 1, 2, 3, …
        assert_eq!(first_revision(window, Some(570_000)), 1);
        assert_eq!(first_revision(window, Some(600_000)), 1);
        assert_eq!(first_revision(window, None), 1);
        // A loss 1 ms into the window: above 2^20 revisions of the epoch before.
        assert_eq!(first_revision(window, Some(600_001)), (1 << 20) + 1);
        assert!(
            first_revision(window, Some(630_002))
                > first_revision(window, Some(630_001)) + (1 << 20) - 2
        );
        // Exact in Lua's numbers, however late.
        assert_eq!(
            first_revision(window, Some(u64::MAX)) + (1 << 20) - 1,
            1 << 53
        );
    }

    #[test]
    fn a_lease_ends_before_the_heartbeat_by_the_tolerated_offset() {
        let second = Duration::from_secs(1);
        assert_eq!(lease_term(5 * second, second), 4 * second);
        assert_eq!(
            lease_term(5 * second, second / 10),
            Duration::from_millis(4_900)
        );
        assert_eq!(lease_term(2 * second, second), Duration::from_millis(1_500));
    }

    #[test]
    fn a_live_run_that_joined_by_the_window_is_awaited() {
        let registry = [run("a", 540, W_MS + 70_000)];
        assert_eq!(awaited(&registry, W, W_MS + 65_000), (vec!["a"], vec![]));
    }

    #[test]
    fn a_run_that_joined_after_the_window_is_not_awaited() {
        let registry = [run("late", 660, W_MS + 70_000)];
        assert_eq!(
            awaited(&registry, W, W_MS + 65_000),
            (Vec::<&str>::new(), vec![])
        );
    }

    #[test]
    fn a_run_whose_heartbeat_lapsed_during_the_window_is_still_awaited() {
        // Its link stalled just before the window began: its last heartbeat
        // expired 3 s into the window, and its ids for it are on the way.
        let registry = [run("a", 540, W_MS + 65_000), run("b", 540, W_MS + 3_000)];
        assert_eq!(awaited(&registry, W, W_MS + 65_000), (vec!["a"], vec!["b"]));
    }

    #[test]
    fn a_run_whose_heartbeat_lapsed_before_the_window_began_is_not_awaited() {
        // Killed a window earlier: later windows are complete without it.
        let registry = [run("a", 540, W_MS + 65_000), run("dead", 540, W_MS)];
        assert_eq!(awaited(&registry, W, W_MS + 65_000), (vec!["a"], vec![]));
    }

    #[test]
    fn a_window_is_adopted_only_by_a_run_without_part_in_it_once_its_wait_is_over() {
        assert!(adopts(false, true));
        assert!(!adopts(false, false));
        assert!(!adopts(true, true));
    }

    #[test]
    fn the_wait_is_over_the_fleet_wait_after_the_windows_end() {
        // W is 60 s long: it ends at 660 s, and the wait is 5 s.
        let wait = Duration::from_secs(5);
        assert!(!is_wait_over(W, WindowLength::from_secs(60), wait, 664_999));
        assert!(is_wait_over(W, WindowLength::from_secs(60), wait, 665_000));
        assert!(is_wait_over(
            W,
            WindowLength::from_secs(60),
            Duration::ZERO,
            660_000
        ));
    }

    #[test]
    fn only_shards_whose_sentinel_counts_short_are_sent_again() {
        // A cluster: each shard its own sentinel; Redis lost some of shard 2's.
        let own = |shard: usize| shard;
        assert_eq!(short_shards(&[3, 0, 2, 0], &[3, 0, 1, 0], 4, 4, own), [2]);
        assert!(short_shards(&[3, 0, 2, 0], &[3, 0, 2, 0], 4, 4, own).is_empty());
        // A sentinel the survey did not read counts none.
        assert_eq!(short_shards(&[3, 0, 2, 1], &[3, 0, 2], 4, 4, own), [3]);
        // Nothing delivered: nothing to send again.
        assert!(short_shards(&[], &[0, 0, 0, 0], 4, 4, own).is_empty());
    }

    #[test]
    fn on_one_server_a_short_sentinel_sends_every_shard_again() {
        let one = |_: usize| 0;
        assert!(short_shards(&[3, 0, 2, 0], &[5], 4, 1, one).is_empty());
        assert_eq!(short_shards(&[3, 0, 2, 0], &[4], 4, 1, one), [0, 1, 2, 3]);
        assert_eq!(short_shards(&[7], &[0], 1, 1, one), [0]);
    }

    #[test]
    fn a_run_with_the_fleets_layout_is_not_refused() {
        let layout = Layout {
            shards: 16,
            window_secs: 60,
            sets_per_window: true,
        };
        assert_eq!(refusal(layout, layout, "verve"), None);
        assert_eq!(layout.registered_shards(), "16+sets");
        assert_eq!(Layout::of_fleet("16+sets", 60), layout);
    }

    #[test]
    fn a_fleet_of_an_earlier_version_is_refused_whatever_its_counts() {
        let here = Layout {
            shards: 16,
            window_secs: 60,
            sets_per_window: true,
        };
        // What an earlier version registered: the count alone.
        let fleet = Layout::of_fleet("16", 60);
        assert!(!fleet.sets_per_window);
        let line = refusal(here, fleet, "verve").unwrap();
        assert!(line.starts_with("the fleet sharing this Redis (prefix verve) runs a verve that writes one set per shard"), "{line}");
    }

    #[test]
    fn a_shard_is_split_into_enough_sets_for_twice_the_expected_ids() {
        // Redis's default set-max-intset-entries (512): sets of 256.
        assert_eq!(sets_per_shard(0, 1, 512), 1);
        assert_eq!(sets_per_shard(256, 1, 512), 1);
        assert_eq!(sets_per_shard(257, 1, 512), 2);
        assert_eq!(sets_per_shard(1_000_000, 1, 512), 4_096);
        // A raised limit: sets of 2,048 at most, however high it is.
        assert_eq!(sets_per_shard(5_000_000, 1, 8_192), 4_096);
        assert_eq!(sets_per_shard(5_000_000, 1, 1 << 20), 4_096);
        assert_eq!(sets_per_shard(5_000_000, 48, 8_192), 64);
        // Never more than 16,384 sets per window in all.
        assert_eq!(sets_per_shard(u64::MAX / 2, 1, 8_192), 16_384);
        assert_eq!(sets_per_shard(u64::MAX / 2, 48, 8_192), 256);
        assert_eq!(sets_per_shard(u64::MAX / 2, 100_000, 8_192), 1);
        // No compact sets worth the name: one set per shard.
        assert_eq!(sets_per_shard(1_000_000, 1, 0), 1);
        assert_eq!(sets_per_shard(1_000_000, 1, 63), 1);
        assert_eq!(sets_per_shard(1_000_000, 1, 64), 16_384);
        assert_eq!(sets_per_shard(u64::MAX, 1, 8_192), 16_384);
    }

    #[test]
    fn a_window_is_expected_to_hold_the_latest_count_or_the_rate_over_the_window() {
        let minute = Duration::from_secs(60);
        let second = Duration::from_secs(1);
        assert_eq!(expected_ids(0, 0, second, minute, 1), 0);
        assert_eq!(expected_ids(0, 1_000, second, minute, 1), 60_000);
        assert_eq!(expected_ids(0, 1_000, second, minute, 3), 180_000);
        assert_eq!(expected_ids(500_000, 1_000, second, minute, 3), 500_000);
        // Ids queued no time ago count as queued over a millisecond.
        assert_eq!(expected_ids(0, 2, Duration::ZERO, minute, 1), 120_000);
        // A day's window: the rate over a minute, or the latest window's count.
        let day = Duration::from_secs(86_400);
        assert_eq!(expected_ids(0, 1_000, second, day, 1), 60_000);
        assert_eq!(expected_ids(9_000_000, 1_000, second, day, 1), 9_000_000);
    }

    #[test]
    fn a_window_of_many_sets_is_checked_less_often() {
        let poll = Duration::from_millis(250);
        assert_eq!(poll_interval(poll, 1), poll);
        assert_eq!(poll_interval(poll, 2_048), poll);
        assert_eq!(poll_interval(poll, 4_096), Duration::from_micros(491_520));
        assert_eq!(
            poll_interval(poll, 16_384),
            Duration::from_micros(1_966_080)
        );
    }

    #[test]
    fn ids_wait_a_128th_of_a_window_for_their_round() {
        let wait = |secs| round_wait(WindowLength::from_secs(secs));
        assert_eq!(wait(60), Duration::from_micros(468_750));
        assert_eq!(wait(2), Duration::from_micros(15_625));
        assert_eq!(wait(3600), Duration::from_millis(500));
    }

    #[test]
    fn a_run_with_another_window_length_is_refused_with_one_line() {
        let here = Layout {
            shards: 1,
            window_secs: 6,
            sets_per_window: true,
        };
        let fleet = Layout {
            window_secs: 3,
            ..here
        };
        assert_eq!(
            refusal(here, fleet, "verve").as_deref(),
            Some(
                "VERVE_WINDOW_SECS is 6 here but 3 in the fleet sharing this Redis (prefix verve): \
                 every instance must count the same windows, or one window's set would take in \
                 another's ids; set it to 3 (or use another VERVE_REDIS_PREFIX)"
            )
        );
    }

    #[test]
    fn another_shard_count_is_named_first() {
        let here = Layout {
            shards: 4,
            window_secs: 6,
            sets_per_window: true,
        };
        let fleet = Layout {
            shards: 16,
            window_secs: 3,
            sets_per_window: true,
        };
        let line = refusal(here, fleet, "p").unwrap();
        assert!(
            line.starts_with("VERVE_REDIS_SHARDS is 4 here but 16"),
            "{line}"
        );
    }

    #[test]
    fn the_clock_offset_is_taken_against_the_middle_of_the_call() {
        let sent = 1_000_000_000;
        // Redis read its clock 2.5 s ahead of the call's middle (sent + 10 ms).
        assert_eq!(
            clock_offset_ms(sent, sent + 20_000, sent + 2_510_000),
            2_500
        );
        assert_eq!(
            clock_offset_ms(sent, sent + 20_000, sent - 1_990_000),
            -2_000
        );
        assert_eq!(clock_offset_ms(sent, sent + 20_000, sent + 10_000), 0);
    }

    fn unacknowledged() -> Unacknowledged {
        Unacknowledged {
            revision: 2,
            acked: 1,
            mine: false,
            resent: 0,
            waited: Duration::from_secs(9),
        }
    }

    #[test]
    fn a_record_not_acknowledged_in_time_is_sent_on_by_a_follower() {
        let bound = Duration::from_secs(8);
        assert!(unacknowledged().resends(bound));
        let early = Unacknowledged {
            waited: Duration::from_secs(7),
            ..unacknowledged()
        };
        assert!(!early.resends(bound));
        let acked = Unacknowledged {
            acked: 2,
            ..unacknowledged()
        };
        assert!(!acked.resends(bound));
    }

    #[test]
    fn a_run_never_resends_its_own_record_nor_one_revision_twice() {
        let bound = Duration::from_secs(8);
        let mine = Unacknowledged {
            mine: true,
            ..unacknowledged()
        };
        assert!(!mine.resends(bound));
        let resent = Unacknowledged {
            resent: 2,
            ..unacknowledged()
        };
        assert!(!resent.resends(bound));
    }

    #[test]
    fn windows_skipped_by_a_jump_move_the_first_window_on() {
        let w = |minute: u64| WindowStart::from_unix_secs(600 + minute * 60);
        assert_eq!(first_window_after_skip(w(1), w(1)), None);
        assert_eq!(first_window_after_skip(w(1), w(120)), Some(w(120)));
        assert_eq!(first_window_after_skip(w(1), w(2)), Some(w(2)));
        // A window closed again (a retry) is no skip.
        assert_eq!(first_window_after_skip(w(2), w(1)), None);
    }
}
