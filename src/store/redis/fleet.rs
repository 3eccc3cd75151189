//! The fleet protocol: how instances sharing a Redis agree on each window's count.
//!
//! The fleet's members are runs, one per process (`<instance>/<pid>-<start ms>`):
//! a restarted instance is a new member, and what its earlier process left unsaid
//! stays that process's. Keys, for a window `W` (its start, RFC 3339) and the
//! prefix `P`, each named for the Redis Cluster slot it must share (the part in
//! braces is the hash tag):
//!
//! - `P:{W}`: the set of the window's ids, filled by every run; with
//!   `VERVE_REDIS_SHARDS` = S > 1, S disjoint sets `P:{W/k}` (or `P:{W/k/n}`) instead,
//!   an id in shard [`shard_of`] of it, each tag chosen so that shard k's slot is in
//!   the k-th of S slices of the slots and Redis Cluster spreads the shards evenly
//!   over its masters (`slots`); the window's count is the sum of their sizes.
//! - The sentinel of the ids, `…:delivered` and `…:rounds`: per run, how many ids
//!   it has delivered, counted atomically with the ids and once per numbered
//!   round, so that a failover or a restart rolls them back together. On a
//!   cluster each shard has its own, on its slot (`P:{W/k}:delivered`; written by
//!   `round.lua` with the ids); on one server, where the shards are lost or kept
//!   together, one serves the window (`P:{W}:delivered`; `count.lua` in the
//!   round's transaction), so that shards cost no more calls per round.
//! - `P:{W}:marks`: per run, `sending` (from its first ids for the window on) or,
//!   once its last ids for the window are acknowledged, `full` or `partial`
//!   (done; whether it ran for the whole window).
//! - `P:{W}:record`: the latest published record (revision, count, complete,
//!   partial, instances, published_at), the run that published it, the highest
//!   revision the shared sinks acknowledged, and the window's generation (raised
//!   by every mark that makes a run done). It outlives the window's other keys
//!   (it lives as long as the registry's), so that a run back after they expired
//!   never publishes a revision number already used.
//! - `P:{fleet}:instances`, `…:joined`, `…:left`: the runs (a sorted set scored
//!   by heartbeat expiry, by Redis's clock: live ones, and lapsed ones for as long
//!   as window keys live by default), each one's first window, and the runs that
//!   left lately, with when.
//! - `P:{fleet}:epoch`: `<number>:<tag>`, created by the first heartbeat,
//!   renewed by every one; only Redis losing its data (or the whole fleet gone
//!   for an hour) makes it change, and a run that knew the old one numbers the
//!   new one past it. Revisions of epoch E start at E × 2^32 + 1, so none
//!   published after a loss repeats one published before.
//! - `P:{fleet}:orphans`: unfinished windows, noted by every run's first round to
//!   a window and by runs that stopped; a live run adopts one once its wait is
//!   over, so a window whose every run was killed is still published.
//! - `P:{fleet}:shards`, `P:{fleet}:window_secs`: set by the first heartbeat; a
//!   run with another value of either is refused (it would count some ids twice,
//!   or in another window's set).
//!
//! Every window key expires a while after its last write (each write renews it):
//! five windows, at least five minutes, and at least four fleet waits; the
//! registry's keys and the records an hour after the last heartbeat. On a
//! cluster no script touches two slots. The decisions (who is awaited, who
//! adopts, who is refused, who resends) are plain functions in `rules`.
//!
//! A run registers (its first heartbeat) before it accepts an id, when Redis is
//! reachable; until the fleet took it in, new ids get 503. A run done with a
//! window settles it, and checks it again every poll interval until the fleet is
//! done with it. A settle is a survey (`roster.lua` on the registry: the epoch,
//! every run with its heartbeat expiry, Redis's clock; `tally.lua` on every
//! shard: its size, and what this run delivered to it), then `settle.lua` on the
//! window's slot, which marks the run done and, if every run that started before
//! the window ended and was live when it began (lapsed since or not), and every
//! run that delivered ids to it, is done, publishes the
//! window: the surveyed count, and a revision one higher than the last, taken
//! together. The count was read on other slots: the window's generation (see
//! `settle.lua`) tells the script whether some run became done after the shards
//! were read, in which case it is read again. Once the fleet's wait is over
//! (`VERVE_FLEET_WAIT_MS` after the window ended), settles publish whatever is
//! there with `complete=false`. Whenever the count grows after that (a run that
//! was cut off delivers its ids), the next settle publishes a revision. The script
//! publishes for exactly one caller per revision, so each revision reaches the
//! shared sinks once; if they do not acknowledge it in time (its publisher died,
//! or cannot reach them), another run following the window sends it.
//!
//! If Redis loses ids (a restart, from a snapshot or empty, `FLUSHALL`, a failover
//! to a replica that lagged), it loses or rolls back the deliveries counted beside
//! them: a shard where this run's count in Redis is short of what it delivered is
//! sent again from the local set. A lost record is put back from the latest one
//! each run passes in, so revisions keep increasing. The epoch tells the rest: for
//! one heartbeat lifetime after noticing a loss, a run also waits for every run it
//! saw live in the two heartbeat lifetimes before it, and for every run it saw
//! take part in the window, and does not publish a window with no record before
//! the runs that knew its record had time to put it back.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use redis::{Cmd, RedisResult, Script, Value};

use super::rules::{self, Layout, Registered, Remembered};
use super::slots::ShardTags;
use super::RedisSettings;
use crate::config::RedisMode;
use crate::record::{CountRecord, Scope, Timestamp};
use crate::redis_link::RedisLink;
use crate::window::{WindowLength, WindowStart};

/// Which of `shards` sets an id goes to: a fixed multiplicative hash, the same in
/// every instance and every version (it is part of the layout in Redis).
pub(super) fn shard_of(id: i64, shards: usize) -> usize {
    let mixed = (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((mixed >> 32) % shards as u64) as usize
}

/// The keys of `window`'s sets of ids in Redis, under `prefix`, split over
/// `shards`: for operators and tests that look into Redis.
pub fn window_sets(prefix: &str, window: WindowStart, shards: usize) -> Vec<String> {
    let mut keys = Keys::new(prefix, shards, RedisMode::Single);
    (0..shards).map(|shard| keys.set(window, shard)).collect()
}

/// The names of the protocol's keys, each naming the slot it must share (the
/// part in braces).
struct Keys {
    prefix: String,
    shards: usize,
    tags: ShardTags,
    /// Each shard has its own sentinel beside it (a cluster), rather than one for
    /// the whole window (one server: its shards are lost or kept together).
    sentinel_per_shard: bool,
}

impl Keys {
    fn new(prefix: &str, shards: usize, mode: RedisMode) -> Self {
        Keys {
            prefix: prefix.to_owned(),
            shards,
            tags: ShardTags::new(shards),
            sentinel_per_shard: mode == RedisMode::Cluster,
        }
    }

    /// A key of `window`'s bookkeeping, on the window's slot.
    fn window(&self, window: WindowStart, part: &str) -> String {
        format!("{}:{{{window}}}{part}", self.prefix)
    }

    /// A key of shard `shard` of `window`, on the shard's slot ([`ShardTags`]).
    /// With one shard, on the window's slot.
    fn shard_key(&mut self, window: WindowStart, shard: usize, part: &str) -> String {
        match self.shards {
            1 => self.window(window, part),
            _ => format!("{}:{{{}}}{part}", self.prefix, self.tags.tag(window, shard)),
        }
    }

    /// Shard `shard`'s set of `window`'s ids.
    fn set(&mut self, window: WindowStart, shard: usize) -> String {
        self.shard_key(window, shard, "")
    }

    /// How many sentinels a window has: one per shard, or one in all.
    fn sentinels(&self) -> usize {
        match self.sentinel_per_shard {
            true => self.shards,
            false => 1,
        }
    }

    /// Which sentinel counts the ids of shard `shard`.
    fn sentinel_of(&self, shard: usize) -> usize {
        match self.sentinel_per_shard {
            true => shard,
            false => 0,
        }
    }

    /// The sets of `window` whose ids sentinel `sentinel` counts.
    fn counted_by(&mut self, window: WindowStart, sentinel: usize) -> Vec<String> {
        match self.sentinel_per_shard {
            true => vec![self.set(window, sentinel)],
            false => (0..self.shards)
                .map(|shard| self.set(window, shard))
                .collect(),
        }
    }

    /// Sentinel `sentinel` of `window`: its deliveries (run -> ids) and rounds
    /// (run -> last round), beside the ids it counts.
    fn sentinel(&mut self, window: WindowStart, sentinel: usize) -> [String; 2] {
        match self.sentinel_per_shard {
            true => [":delivered", ":rounds"].map(|part| self.shard_key(window, sentinel, part)),
            false => [":delivered", ":rounds"].map(|part| self.window(window, part)),
        }
    }

    /// A key of the registry, on the fleet's slot.
    fn fleet(&self, name: &str) -> String {
        format!("{}:{{fleet}}:{name}", self.prefix)
    }
}

/// The longest between two heartbeats.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// The longest between two checks of a window the fleet has not finished.
const POLL: Duration = Duration::from_millis(250);

/// After a loss of Redis's data, instances seen live within this many fleet waits
/// are waited for: a heartbeat lifetime, and one more for an instance cut off.
const SEEN_FOR_WAITS: u32 = 2;

/// A run that left is remembered this long (for a record it published to be sent
/// on only after its shutdown had time to deliver it).
const LEFT_REMEMBERED: Duration = Duration::from_secs(3600);

/// Records the highest revision the shared sinks acknowledged.
const ACK: &str = "\
local acked = tonumber(redis.call('HGET', KEYS[1], 'acked') or '0')
if tonumber(ARGV[1]) > acked and redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'acked', ARGV[1])
end
return 0";

/// Whether an instance ran for the whole of a window it is done with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Coverage {
    Full,
    Partial,
}

/// What this run knows of a window it settles.
#[derive(Debug, Clone)]
pub(super) struct WindowView {
    /// Its mark, or `None` for a window it took no part in (left by another).
    pub coverage: Option<Coverage>,
    /// How many ids it delivered to each shard of the window (empty: none).
    pub delivered: Vec<u64>,
    /// The latest record seen.
    pub known: Option<Published>,
    /// The highest revision the shared sinks acknowledged, as last seen.
    pub acked: u64,
    /// Every run seen taking part, waited for even if Redis loses their marks.
    pub members: BTreeSet<String>,
    /// The window's generation as last seen, if it was.
    pub generation: Option<u64>,
}

/// How a round counts its ids as this run's deliveries to a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Count {
    /// Adds them to the count: after a loss of Redis's data, the count starts
    /// again from nothing and stays short of what the run delivered.
    Add,
    /// Starts the count again with them (a replay's first round to the shard).
    Set,
}

/// When `settle.lua` may publish without every instance done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Force {
    No,
    /// The fleet's wait for the window is over.
    Yes,
    /// This instance is leaving: publish unless another live instance still may.
    IfAlone,
}

/// The fleet and a window's shards as a settle found them, before deciding.
#[derive(Debug, Clone)]
pub(super) struct Survey {
    /// The fleet's epoch.
    pub epoch: String,
    /// The runs in the registry, live or lapsed, with each one's first window
    /// and heartbeat expiry.
    pub registry: Vec<Registered>,
    /// Redis's clock when it read the registry, in ms since the epoch.
    pub now_ms: u64,
    /// The window's count: the sum of its shards' sizes (they are disjoint).
    pub count: u64,
    /// Per sentinel: the ids Redis counts as delivered by this run.
    pub counted: Vec<u64>,
    /// Every run that delivered ids to some shard of the window.
    pub delivered_by: BTreeSet<String>,
}

/// What `settle.lua` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Settled {
    pub outcome: Outcome,
    /// The latest published record, if any.
    pub record: Option<Published>,
    /// The window's count right now, published or not.
    pub count: u64,
    /// The window's generation.
    pub generation: u64,
    /// Instances done with the window right now.
    pub done: u64,
    /// Every run that took part in the window: done, or still sending.
    pub members: Vec<String>,
    /// The highest revision the shared sinks acknowledged.
    pub acked: u64,
    /// The run that published the record is live.
    pub publisher_live: bool,
    /// When the run that published the record left the fleet, in ms since the
    /// epoch; 0 if it is live, or unknown (its heartbeat expired).
    pub publisher_left_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// A run became done after the shards were read: survey again, then retry.
    Again,
    /// This call published a new revision.
    Published,
    /// Nothing new was published by this call.
    Unchanged,
}

/// A record as stored in Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Published {
    pub revision: u64,
    pub unique_requests: u64,
    pub complete: bool,
    pub partial: bool,
    pub instances: u64,
    pub published_at_ms: u64,
    /// The run that published it ([`Fleet::run`]).
    pub by: String,
}

impl Published {
    pub fn to_record(&self, window: WindowStart, window_secs: u64) -> CountRecord {
        CountRecord {
            window_start: window,
            window_seconds: window_secs,
            unique_requests: self.unique_requests,
            scope: Scope::Global,
            revision: self.revision,
            complete: self.complete,
            partial: self.partial,
            instances: self.instances,
            published_at: Timestamp::from_unix_millis(self.published_at_ms),
        }
    }
}

/// The commands of one round of ids, and what they deliver to each shard.
pub(super) struct RoundCommands {
    pub commands: Vec<Cmd>,
    /// The commands must run as one transaction (`MULTI`).
    pub atomic: bool,
    /// Per shard the round writes to: the shard, and how many ids it adds.
    pub shards: Vec<(usize, u64)>,
}

/// This run's side of the protocol: key names, scripts, what it knows of the fleet.
pub(super) struct Fleet {
    keys: Keys,
    /// This process's name in the fleet: distinct from an earlier process that ran
    /// under the same instance name.
    pub run: String,
    /// The window this process started in: it has no ids for earlier ones.
    first_window: WindowStart,
    window_secs: u64,
    /// Window keys live this long, in seconds.
    key_ttl_secs: u64,
    /// A run whose heartbeat expired stays in the registry this long, in ms, to
    /// be waited for on the windows it was live in: the default key TTL, longer
    /// than any run follows a window (not shortened by the test hook).
    lapsed_kept_ms: u64,
    /// `VERVE_REDIS_SHARDS`: sets per window.
    pub shards: usize,
    /// One server: a round may be a transaction over all its keys.
    atomic: bool,
    /// `count.lua`, for the rounds of a single server.
    count: &'static str,
    /// `VERVE_FLEET_WAIT_MS`: the heartbeat's time to live, and how long after a
    /// window's end the fleet waits for every instance.
    pub wait: Duration,
    settle: Script,
    heartbeat: Script,
    leave: Script,
    ack: Script,
    round: Script,
    tally: Script,
    roster: Script,
    /// The live runs, as of the last heartbeat.
    live: Vec<String>,
    /// Why this run must not deliver to the fleet (its shards or window length
    /// differ), as of the last heartbeat.
    pub refusal: Option<String>,
    /// How far Redis's clock was ahead of this host's at the last heartbeat, ms.
    pub clock_offset_ms: Option<i64>,
    /// This run has left the fleet: it no longer registers.
    left: bool,
    /// When each run was last seen live, for as long as a loss could need it.
    seen: BTreeMap<String, Instant>,
    /// The fleet's epoch at the last heartbeat.
    epoch: Option<String>,
    /// Runs seen live before Redis lost its data: waited for as if still live
    /// until `uncertain_until`, and on the windows that began before the loss
    /// until they register again ([`rules::lost_with_data`]), for as long as
    /// such a window may be settled (`remembered_until`).
    remembered: Vec<Remembered>,
    uncertain_until: Option<Instant>,
    remembered_until: Option<Instant>,
}

impl Fleet {
    pub fn new(settings: &RedisSettings) -> Self {
        let (window_secs, wait) = (settings.window_secs, settings.fleet_wait);
        let (shards, mode, instance) = (settings.shards, settings.mode, &settings.instance);
        // Five windows, at least five minutes and four fleet waits: longer than
        // any run follows a window.
        let default_ttl = (window_secs * 5).max(300).max(4 * wait.as_secs());
        Fleet {
            keys: Keys::new(&settings.prefix, shards, mode),
            run: format!(
                "{instance}/{}-{}",
                std::process::id(),
                Timestamp::now().unix_millis()
            ),
            first_window: settings.first_window,
            window_secs,
            key_ttl_secs: settings.key_ttl_secs.unwrap_or(default_ttl),
            lapsed_kept_ms: default_ttl * 1000,
            shards,
            atomic: mode == RedisMode::Single,
            count: include_str!("count.lua"),
            wait,
            settle: Script::new(include_str!("settle.lua")),
            heartbeat: Script::new(include_str!("heartbeat.lua")),
            leave: Script::new(include_str!("leave.lua")),
            ack: Script::new(ACK),
            round: Script::new(include_str!("round.lua")),
            tally: Script::new(include_str!("tally.lua")),
            roster: Script::new(include_str!("roster.lua")),
            live: Vec::new(),
            refusal: None,
            clock_offset_ms: None,
            left: false,
            seen: BTreeMap::new(),
            epoch: None,
            remembered: Vec::new(),
            uncertain_until: None,
            remembered_until: None,
        }
    }

    /// How often to tell the fleet this instance is alive: several times per
    /// heartbeat lifetime, so that one late heartbeat does not drop it.
    pub fn heartbeat_interval(&self) -> Duration {
        HEARTBEAT.min(self.wait / 4)
    }

    /// How often to check a window the fleet has not finished.
    pub fn poll_interval(&self) -> Duration {
        POLL.min(self.wait / 4)
    }

    /// Commands adding `ids` to `window` as round `round` of this run's deliveries
    /// to it, counted as `count` says, so that the ids and their count go in
    /// together or not at all, and a round is counted once however often it is
    /// sent. On a cluster, per shard one `round.lua` (atomic on the shard's node,
    /// counted by the shard's own sentinel); on a single server, one transaction
    /// of plain `SADD`s and one `count.lua` for the window's one sentinel (the
    /// same effect, without passing every id through Lua). The window's first
    /// round also sets this run's `sending` mark. Every round gives the keys it
    /// writes their time to live again: Redis may have lost them since the last
    /// (a restart, `FLUSHALL`), and a key a round creates must never live forever,
    /// even if every run that wrote it dies before it settles the window.
    pub fn round(
        &mut self,
        window: WindowStart,
        ids: &[i64],
        round: u64,
        count: Count,
    ) -> RoundCommands {
        let mode = match count {
            Count::Add => "add",
            Count::Set => "set",
        };
        let ttl = self.key_ttl_secs;
        let mut commands = Vec::new();
        let mut shards = Vec::new();
        for (shard, ids) in self.split(ids).iter().enumerate() {
            if ids.is_empty() {
                continue;
            }
            let set = self.keys.set(window, shard);
            if self.atomic {
                let mut add = redis::cmd("SADD");
                add.arg(&set).arg(&ids[..]);
                let mut expire = redis::cmd("EXPIRE");
                expire.arg(&set).arg(ttl);
                commands.extend([add, expire]);
            } else {
                let [delivered, rounds] = self.keys.sentinel(window, shard);
                let mut call = evalsha(&self.round, &[set, delivered, rounds]);
                call.arg(&self.run)
                    .arg(round)
                    .arg(mode)
                    .arg(ttl)
                    .arg(&ids[..]);
                commands.push(call);
            }
            shards.push((shard, ids.len() as u64));
        }
        if self.atomic && !shards.is_empty() {
            let ids: u64 = shards.iter().map(|(_, ids)| ids).sum();
            // Sent whole: a script not loaded yet would fail inside the transaction.
            let mut call = redis::cmd("EVAL");
            call.arg(self.count)
                .arg(2)
                .arg(&self.keys.sentinel(window, 0))
                .arg(&self.run)
                .arg(round)
                .arg(mode)
                .arg(ids)
                .arg(ttl);
            commands.push(call);
        }
        if round == 1 {
            commands.extend(self.sending(window));
        }
        RoundCommands {
            commands,
            shards,
            atomic: self.atomic,
        }
    }

    /// Commands setting this run's mark for `window` to `sending` (it has ids for
    /// the window that are not all in), and noting the window among the fleet's
    /// unfinished ones (`P:{fleet}:orphans`), so that a live run adopts it once
    /// its wait is over even if every run that sent ids to it was killed;
    /// whoever settles it complete, or adopts it, takes it off the list.
    pub fn sending(&self, window: WindowStart) -> [Cmd; 4] {
        let marks = self.keys.window(window, ":marks");
        let mut mark = redis::cmd("HSET");
        mark.arg(&marks).arg(&self.run).arg("sending");
        let mut expire = redis::cmd("EXPIRE");
        expire.arg(&marks).arg(self.key_ttl_secs);
        let unfinished = self.keys.fleet("orphans");
        let mut note = redis::cmd("SADD");
        note.arg(&unfinished).arg(window.unix_secs());
        let mut keep = redis::cmd("EXPIRE");
        keep.arg(&unfinished).arg(self.registry_ttl_secs());
        [mark, expire, note, keep]
    }

    /// How long the registry's keys live after the last heartbeat that renewed
    /// them: longer than any window key, and than a run that left is remembered.
    pub fn registry_ttl_secs(&self) -> u64 {
        self.key_ttl_secs.max(LEFT_REMEMBERED.as_secs())
    }

    /// `ids` by shard; with one shard, as they are.
    fn split<'a>(&self, ids: &'a [i64]) -> Vec<std::borrow::Cow<'a, [i64]>> {
        if self.shards == 1 {
            return vec![std::borrow::Cow::Borrowed(ids)];
        }
        let mut shards = vec![Vec::new(); self.shards];
        for &id in ids {
            shards[shard_of(id, self.shards)].push(id);
        }
        shards.into_iter().map(std::borrow::Cow::Owned).collect()
    }

    /// Runs `commands` in one pipeline (one round trip per node), as one
    /// transaction if `atomic`, teaching a node that lacks them the scripts that
    /// pipelines call by hash.
    pub fn pipeline(
        &self,
        link: &mut RedisLink,
        commands: Vec<Cmd>,
        atomic: bool,
    ) -> RedisResult<Vec<Value>> {
        link.pipeline(commands, atomic, &[&self.round, &self.tally, &self.roster])
    }

    /// Tells the fleet this run is alive, learns who is live, notices when Redis
    /// lost its data (the epoch changed), and returns the windows stopped runs
    /// left to the fleet. Once this run has left, it only reads the epoch: it must
    /// not come back to life in the registry.
    pub fn heartbeat(&mut self, link: &mut RedisLink) -> RedisResult<Vec<WindowStart>> {
        if self.left {
            let epoch: Option<String> = redis::cmd("GET")
                .arg(self.keys.fleet("epoch"))
                .query(link.connection())?;
            self.learn_epoch(epoch.unwrap_or_default());
            return Ok(Vec::new());
        }
        let sent_us = unix_micros();
        let answer: HeartbeatAnswer = self
            .heartbeat
            .key(self.keys.fleet("instances"))
            .key(self.keys.fleet("joined"))
            .key(self.keys.fleet("left"))
            .key(self.keys.fleet("epoch"))
            .key(self.keys.fleet("orphans"))
            .key(self.keys.fleet("shards"))
            .key(self.keys.fleet("window_secs"))
            .arg(&self.run)
            .arg(self.wait.as_millis() as u64)
            .arg(self.first_window.unix_secs())
            .arg(self.epoch.as_deref().unwrap_or_default())
            .arg(LEFT_REMEMBERED.as_millis() as u64)
            .arg(self.shards)
            .arg(self.lapsed_kept_ms)
            .arg(self.registry_ttl_secs())
            .arg(self.window_secs)
            // Tagged distinctly each time: the same run may set it again after a loss.
            .arg(rules::next_epoch(
                self.epoch.as_deref(),
                &format!("{}@{}", self.run, Timestamp::now().unix_millis()),
            ))
            .invoke(link.connection())?;
        let (epoch, live, orphans, shards, window_secs, redis_us) = answer;
        let received_us = unix_micros();
        self.clock_offset_ms = Some(rules::clock_offset_ms(sent_us, received_us, redis_us));
        let here = Layout {
            shards: self.shards,
            window_secs: self.window_secs,
        };
        let fleet = Layout {
            shards,
            window_secs,
        };
        if let Some(refusal) = rules::refusal(here, fleet, &self.keys.prefix) {
            if self.refusal.is_none() {
                tracing::error!("{refusal}; this instance delivers nothing until it is fixed");
            }
            self.refusal = Some(refusal.clone());
            return Err((redis::ErrorKind::Client, "refused", refusal).into());
        }
        self.refusal = None;
        self.learn_epoch(epoch);
        let now = Instant::now();
        for run in &live {
            self.seen.insert(run.clone(), now);
        }
        let horizon = self.wait * SEEN_FOR_WAITS;
        self.seen.retain(|_, at| now.duration_since(*at) < horizon);
        self.live = live;
        Ok(orphans
            .into_iter()
            .map(WindowStart::from_unix_secs)
            .collect())
    }

    fn learn_epoch(&mut self, epoch: String) {
        if self.epoch.as_ref().is_some_and(|known| *known != epoch) {
            tracing::warn!(
                "Redis lost its data (the fleet's epoch key changed); windows are sent again as they are settled"
            );
            self.lost_data();
        }
        self.epoch = Some(epoch);
    }

    /// Whether `epoch` is the one this run learned at its last heartbeat: if not,
    /// Redis lost its data since, and the run must beat before it settles.
    pub fn knows_epoch(&self, epoch: &str) -> bool {
        self.epoch.as_deref() == Some(epoch)
    }

    /// Redis lost its data: for a heartbeat lifetime, every instance seen live
    /// lately (even one whose heartbeat had just expired: it may be cut off, with
    /// ids on the way) is waited for, whatever the registry says; and on the
    /// windows that began before now, until it registers again.
    pub fn lost_data(&mut self) {
        let noticed_in = WindowLength::from_secs(self.window_secs).window_of(SystemTime::now());
        for run in self.seen.keys() {
            if !self.remembered.iter().any(|r| r.run == *run) {
                self.remembered.push(Remembered {
                    run: run.clone(),
                    noticed_in,
                });
            }
        }
        let now = Instant::now();
        self.uncertain_until = Some(now + self.wait);
        self.remembered_until = Some(now + Duration::from_millis(self.lapsed_kept_ms));
    }

    /// This run has no ids for windows before `window` that it has not closed
    /// (the clock jumped forward): registered from the next heartbeat on, so
    /// that the fleet does not wait for it on them.
    pub fn starts_at(&mut self, window: WindowStart) {
        self.first_window = self.first_window.max(window);
    }

    /// Whether a loss of Redis's data was noticed less than a heartbeat lifetime ago.
    pub fn is_uncertain(&mut self) -> bool {
        if self
            .uncertain_until
            .is_some_and(|until| Instant::now() >= until)
        {
            self.uncertain_until = None;
        }
        if self
            .remembered_until
            .is_some_and(|until| Instant::now() >= until)
        {
            self.remembered_until = None;
            self.remembered.clear();
        }
        self.uncertain_until.is_some()
    }

    /// Leaves the fleet (shutdown), leaving `unfinished` windows to it: whoever
    /// settles them takes them off the list.
    pub fn leave(&mut self, link: &mut RedisLink, unfinished: &[WindowStart]) -> RedisResult<()> {
        let mut call = self.leave.prepare_invoke();
        for name in ["instances", "joined", "left", "orphans"] {
            call.key(self.keys.fleet(name));
        }
        call.arg(&self.run).arg(self.registry_ttl_secs());
        for window in unfinished {
            call.arg(window.unix_secs());
        }
        call.invoke::<()>(link.connection())?;
        self.left = true;
        Ok(())
    }

    /// Records that the shared sinks acknowledged `revision` of `window`.
    pub fn ack(&self, link: &mut RedisLink, window: WindowStart, revision: u64) -> RedisResult<()> {
        self.ack
            .key(self.keys.window(window, ":record"))
            .arg(revision)
            .invoke(link.connection())
    }

    /// Reads the fleet (`roster.lua`) and every shard of `window` (`tally.lua`,
    /// once per sentinel), in one pipeline.
    pub fn survey(&mut self, link: &mut RedisLink, window: WindowStart) -> RedisResult<Survey> {
        let registry = ["instances", "joined", "epoch"].map(|name| self.keys.fleet(name));
        let mut commands = vec![evalsha(&self.roster, &registry)];
        for sentinel in 0..self.keys.sentinels() {
            let mut keys = self.keys.counted_by(window, sentinel);
            keys.extend(self.keys.sentinel(window, sentinel));
            let mut tally = evalsha(&self.tally, &keys);
            tally.arg(&self.run).arg(self.key_ttl_secs);
            commands.push(tally);
        }
        let mut answers = self.pipeline(link, commands, false)?.into_iter();
        let roster = answers.next().unwrap_or(Value::Nil);
        let (epoch, registry, now_ms): (String, Vec<(String, u64, u64)>, u64) =
            redis::from_redis_value(roster)?;
        let mut survey = Survey {
            epoch,
            registry: registry
                .into_iter()
                .map(|(run, first, expires_ms)| Registered {
                    run,
                    first: WindowStart::from_unix_secs(first),
                    expires_ms,
                })
                .collect(),
            now_ms,
            count: 0,
            counted: Vec::with_capacity(self.keys.sentinels()),
            delivered_by: BTreeSet::new(),
        };
        for answer in answers {
            let (size, mine, runs): (u64, u64, Vec<String>) = redis::from_redis_value(answer)?;
            survey.count += size;
            survey.counted.push(mine);
            survey.delivered_by.extend(runs);
        }
        Ok(survey)
    }

    /// The shards to send again, with their sentinel: those whose sentinel counts
    /// fewer of this run's ids than it delivered to them (`delivered`, per
    /// shard). Redis lost some.
    pub fn short_shards(&self, survey: &Survey, delivered: &[u64]) -> Vec<usize> {
        let mut sent = vec![0; self.keys.sentinels()];
        for (shard, &ids) in delivered.iter().enumerate() {
            sent[self.keys.sentinel_of(shard)] += ids;
        }
        let counted = |sentinel: usize| survey.counted.get(sentinel).copied().unwrap_or(0);
        (0..self.shards)
            .filter(|&shard| {
                let sentinel = self.keys.sentinel_of(shard);
                counted(sentinel) < sent[sentinel]
            })
            .collect()
    }

    /// Which sentinel counts the ids of shard `shard`.
    pub fn sentinel_of(&self, shard: usize) -> usize {
        self.keys.sentinel_of(shard)
    }

    /// How many sentinels a window has.
    pub fn sentinels(&self) -> usize {
        self.keys.sentinels()
    }

    /// Marks this instance done with `window` (unless it took no part in it) and
    /// publishes the window, with the count `survey` found, if the fleet is done
    /// with it, or as `force` says.
    pub fn settle(
        &mut self,
        link: &mut RedisLink,
        window: WindowStart,
        view: &WindowView,
        survey: &Survey,
        force: Force,
    ) -> RedisResult<Settled> {
        let mut awaited: Vec<String> = match self.is_uncertain() {
            true => self.remembered.iter().map(|r| r.run.clone()).collect(),
            false => rules::lost_with_data(&self.remembered, &survey.registry, window)
                .into_iter()
                .map(str::to_owned)
                .collect(),
        };
        awaited.extend(view.members.iter().cloned());
        awaited.extend(survey.delivered_by.iter().cloned());
        let (may_have_ids, lapsed) = rules::awaited(&survey.registry, window, survey.now_ms);
        awaited.extend(lapsed.into_iter().map(str::to_owned));
        let mut call = self.settle.prepare_invoke();
        call.key(self.keys.window(window, ":marks"))
            .key(self.keys.window(window, ":record"))
            .arg(&self.run)
            .arg(match view.coverage {
                Some(Coverage::Full) => "full",
                Some(Coverage::Partial) => "partial",
                None => "",
            })
            .arg(match force {
                Force::No => "0",
                Force::Yes => "1",
                Force::IfAlone => "alone",
            })
            .arg(self.key_ttl_secs)
            .arg(self.registry_ttl_secs())
            .arg(view.generation.map_or(String::new(), |g| g.to_string()))
            .arg(survey.count);
        match &view.known {
            Some(known) => call
                .arg(known.revision)
                .arg(known.unique_requests)
                .arg(u8::from(known.complete))
                .arg(u8::from(known.partial))
                .arg(known.instances)
                .arg(known.published_at_ms)
                .arg(view.acked)
                .arg(&known.by),
            None => call.arg(&[0u64; 7][..]).arg(""),
        };
        call.arg(rules::first_revision(rules::epoch_number(&survey.epoch)))
            .arg(may_have_ids.len())
            .arg(&may_have_ids)
            .arg(&awaited);
        let (head, tail): (SettledHead, SettledTail) = call.invoke(link.connection())?;
        let (outcome, revision, unique_requests, complete, partial, instances, at) = head;
        let (by, generation, done, members, acked, release) = tail;
        let outcome = match outcome.as_str() {
            "again" => Outcome::Again,
            "published" => Outcome::Published,
            _ => Outcome::Unchanged,
        };
        if release == 1 {
            redis::cmd("SREM")
                .arg(self.keys.fleet("orphans"))
                .arg(window.unix_secs())
                .exec(link.connection())?;
        }
        let record = (revision > 0).then_some(Published {
            revision,
            unique_requests,
            complete: complete == 1,
            partial: partial == 1,
            instances,
            published_at_ms: at,
            by,
        });
        let publisher_live = record.as_ref().is_some_and(|r| {
            survey
                .registry
                .iter()
                .any(|run| run.run == r.by && run.is_live(survey.now_ms))
        });
        // When a publisher that is gone left matters only for a record the shared
        // sinks have not acknowledged: asked for then alone.
        let publisher_left_ms = match &record {
            Some(r) if !publisher_live && r.revision > acked && r.by != self.run => {
                let left: Option<u64> = redis::cmd("HGET")
                    .arg(self.keys.fleet("left"))
                    .arg(&r.by)
                    .query(link.connection())?;
                left.unwrap_or(0)
            }
            _ => 0,
        };
        Ok(Settled {
            outcome,
            record,
            count: survey.count,
            generation,
            done,
            members,
            acked,
            publisher_live,
            publisher_left_ms,
        })
    }

    /// Whether the fleet's wait for `window` is over (by this host's clock).
    pub fn is_wait_over(&self, window: WindowStart) -> bool {
        let end = window.unix_secs() + self.window_secs;
        Timestamp::now().unix_millis() >= end * 1000 + self.wait.as_millis() as u64
    }

    /// Warns when Redis (any master of a cluster) may evict keys: an evicted
    /// window set would be counted short. Users without the right to read the
    /// configuration are simply not warned.
    pub fn check_eviction_policy(link: &mut RedisLink) {
        let mut get = redis::cmd("CONFIG");
        get.arg("GET").arg("maxmemory-policy");
        let policies = link.on_every_master(&get).and_then(|answers| {
            answers
                .into_iter()
                .map(|answer| Ok(redis::from_redis_value::<Vec<String>>(answer)?))
                .collect::<RedisResult<Vec<_>>>()
        });
        match policies {
            Ok(policies) => {
                let evicting = policies.iter().find_map(|answer| match answer.as_slice() {
                    [_, policy] if policy != "noeviction" => Some(policy.clone()),
                    _ => None,
                });
                if let Some(policy) = evicting {
                    tracing::warn!(
                        policy = %policy,
                        "Redis may evict keys (maxmemory-policy is not noeviction): a window's ids \
                         evicted before its close are counted short; set maxmemory-policy noeviction"
                    );
                }
            }
            Err(error) => tracing::debug!(%error, "cannot read Redis's maxmemory-policy"),
        }
    }
}

/// An `EVALSHA` of `script` on `keys`, for a pipeline; the caller adds the
/// arguments. A node that does not know the script answers `NOSCRIPT`
/// ([`Fleet::pipeline`] loads it then).
fn evalsha(script: &Script, keys: &[String]) -> Cmd {
    let mut call = redis::cmd("EVALSHA");
    call.arg(script.get_hash()).arg(keys.len()).arg(keys);
    call
}

/// This host's clock, in us since the epoch.
fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// `heartbeat.lua`'s answer: the epoch, the live runs, the unfinished windows,
/// the fleet's shards and window length, and Redis's clock (us).
type HeartbeatAnswer = (String, Vec<String>, Vec<u64>, usize, u64, u64);

/// `settle.lua`'s answer, in two parts (redis-rs reads tuples of at most 12).
type SettledHead = (String, u64, u64, u8, u8, u64, u64);
type SettledTail = (String, u64, u64, Vec<String>, u64, u8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_fixed_and_spread_ids_evenly() {
        // Part of the layout in Redis: these must never change.
        assert_eq!(
            [0, 1, 2, 3, -1, i64::MAX, i64::MIN].map(|id| shard_of(id, 16)),
            [0, 9, 2, 12, 6, 6, 0]
        );
        assert!((-500..500).all(|id| shard_of(id, 1) == 0));
        let mut per_shard = [0u32; 16];
        for id in 0..160_000 {
            per_shard[shard_of(id * 7_919, 16)] += 1;
        }
        assert!(
            per_shard.iter().all(|&n| (9_000..11_000).contains(&n)),
            "{per_shard:?}"
        );
    }
}
