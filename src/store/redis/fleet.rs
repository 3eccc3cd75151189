//! The fleet protocol: how instances sharing a Redis agree on each window's count.
//!
//! The fleet's members are runs, one per process (`<instance>/<pid>-<start ms>`):
//! a restarted instance is a new member, and what its earlier process left unsaid
//! stays that process's. Keys, for a window `W` (its start, RFC 3339) and the
//! prefix `P`:
//!
//! - `P:{W}`: the set of the window's ids, filled by every run with `SADD`; with
//!   `VERVE_REDIS_SHARDS` = S > 1, S disjoint sets `P:{W/k}` instead, an id in
//!   shard [`shard_of`] of it, each with a hash tag of its own so that Redis
//!   Cluster may spread them; the window's count is the sum of their sizes.
//! - `P:{W}:marks`: per run, `sending` (from its first ids for the window on) or,
//!   once its last `SADD` for the window is acknowledged, `full` or `partial`
//!   (done; whether it ran for the whole window).
//! - `P:{W}:delivered`, `P:{W}:rounds`: per run, how many ids it has delivered to
//!   the window, counted in the same transaction as the ids and once per round
//!   (`count.lua`): the sentinel of its ids.
//! - `P:{W}:record`: the latest published record (revision, count, complete,
//!   partial, instances, published_at), the run that published it, and the
//!   highest revision the shared sinks acknowledged.
//! - `P:instances`, `P:joined`, `P:left`: the live runs (a sorted set scored by
//!   heartbeat expiry, by Redis's clock), each one's first window, and the runs
//!   that left lately, with when.
//! - `P:epoch`: created by the first heartbeat, without expiry; only Redis losing
//!   its data makes it change.
//! - `P:orphans`: windows left unfinished by runs that stopped.
//! - `P:shards`: the number of shards, set by the first heartbeat; a run with
//!   another number refuses to deliver (it would count some ids twice).
//!
//! Every window key expires a while after the window: five windows, at least five
//! minutes, and at least four fleet waits.
//!
//! A run registers (its first heartbeat) before it accepts an id, when Redis is
//! reachable. A run done with a window runs `settle.lua`, which marks it done and,
//! if every live run that started before the window ended (read in the script: a
//! list from the last heartbeat could miss one that just joined) and every run
//! that delivered ids to the window is done, publishes the window: its `SCARD`,
//! and a revision one higher than the last, taken together in the script. Until
//! that happens the run checks again every poll interval; once the fleet's wait is
//! over (`VERVE_FLEET_WAIT_MS` after the window ended), checks publish whatever is
//! there with `complete=false`. Whenever the count grows after that (a run that was
//! cut off delivers its ids), the next check or done mark publishes a revision. The
//! script publishes for exactly one caller per revision, so each revision reaches
//! the shared sinks once; if that caller dies before they acknowledge it, another
//! run following the window sends it.
//!
//! If Redis loses ids (a restart, from a snapshot or empty, `FLUSHALL`, a failover
//! to a replica that lagged), it loses or rolls back the deliveries counted with
//! them: `settle.lua` answers `lost` when a run's count in Redis is short of what
//! it delivered, and the run sends every id of the window again from its local
//! set. A lost record is put back from the latest one each run passes in, so
//! revisions keep increasing. The epoch tells the rest: for one heartbeat lifetime
//! after noticing a loss, a run also waits for every run it saw live in the two
//! heartbeat lifetimes before it, and for every run it saw take part in the
//! window, and does not publish a window with no record before the runs that knew
//! its record had time to put it back.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use redis::{Connection, RedisResult, Script};

use crate::metrics::now_ms;
use crate::report::{CountRecord, Scope, Timestamp};
use crate::window::WindowStart;

/// Which of `shards` sets an id goes to: a fixed multiplicative hash, the same in
/// every instance and every version (it is part of the layout in Redis).
pub(super) fn shard_of(id: i64, shards: usize) -> usize {
    let mixed = (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((mixed >> 32) % shards as u64) as usize
}

/// Ids per `SADD` command.
const SADD_IDS: usize = 4096;

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
    /// How many ids it delivered to the window.
    pub delivered: u64,
    /// The latest record seen.
    pub known: Option<Published>,
    /// The highest revision the shared sinks acknowledged, as last seen.
    pub acked: u64,
    /// Every run seen taking part, waited for even if Redis loses their marks.
    pub members: BTreeSet<String>,
}

/// How a round counts its ids as this run's deliveries to a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Count {
    /// Adds them to the count: after a loss of Redis's data, the count starts
    /// again from nothing and stays short of what the run delivered.
    Add,
    /// Starts the count again with them (a replay's first round).
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

/// What `settle.lua` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Settled {
    pub outcome: Outcome,
    /// The latest published record, if any.
    pub record: Option<Published>,
    /// The window's count right now, published or not.
    pub count: u64,
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
    /// Redis lost its data since this instance's last heartbeat: beat, then retry.
    Epoch,
    /// Redis lost ids this instance delivered to the window: send them again.
    Lost,
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

/// This run's side of the protocol: key names, scripts, what it knows of the fleet.
pub(super) struct Fleet {
    prefix: String,
    /// This process's name in the fleet: distinct from an earlier process that ran
    /// under the same instance name.
    pub run: String,
    /// The window this process started in: it has no ids for earlier ones.
    first_window: WindowStart,
    window_secs: u64,
    /// Window keys live this long, in seconds.
    key_ttl_secs: u64,
    /// `VERVE_REDIS_SHARDS`: sets per window.
    pub shards: usize,
    /// `VERVE_FLEET_WAIT_MS`: the heartbeat's time to live, and how long after a
    /// window's end the fleet waits for every instance.
    pub wait: Duration,
    settle: Script,
    heartbeat: Script,
    leave: Script,
    ack: Script,
    /// `count.lua`, sent whole inside each round's `MULTI` (a script not yet
    /// loaded there would fail the transaction).
    count: &'static str,
    /// The live runs, as of the last heartbeat.
    live: Vec<String>,
    /// Why this run must not deliver to the fleet (its shards differ), as of the
    /// last heartbeat.
    pub refusal: Option<String>,
    /// This run has left the fleet: it no longer registers.
    left: bool,
    /// When each run was last seen live, for as long as a loss could need it.
    seen: BTreeMap<String, Instant>,
    /// The fleet's epoch at the last heartbeat.
    epoch: Option<String>,
    /// Runs seen live before Redis lost its data, waited for as if still live
    /// until `uncertain_until`.
    remembered: Vec<String>,
    uncertain_until: Option<Instant>,
}

impl Fleet {
    pub fn new(
        prefix: &str,
        instance: &str,
        first_window: WindowStart,
        window_secs: u64,
        wait: Duration,
        shards: usize,
    ) -> Self {
        Fleet {
            prefix: prefix.to_owned(),
            run: format!("{instance}/{}-{}", std::process::id(), now_ms()),
            first_window,
            window_secs,
            key_ttl_secs: (window_secs * 5).max(300).max(4 * wait.as_secs()),
            shards,
            wait,
            settle: Script::new(include_str!("settle.lua")),
            heartbeat: Script::new(include_str!("heartbeat.lua")),
            leave: Script::new(include_str!("leave.lua")),
            ack: Script::new(ACK),
            count: include_str!("count.lua"),
            live: Vec::new(),
            refusal: None,
            left: false,
            seen: BTreeMap::new(),
            epoch: None,
            remembered: Vec::new(),
            uncertain_until: None,
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

    fn window_key(&self, window: WindowStart, part: &str) -> String {
        // The hash tag keeps a window's keys on one Redis Cluster slot.
        format!("{}:{{{window}}}{part}", self.prefix)
    }

    /// The set of shard `shard` of `window`'s ids: with one shard, the window's set.
    fn shard_key(&self, window: WindowStart, shard: usize) -> String {
        match self.shards {
            1 => self.window_key(window, ""),
            _ => format!("{}:{{{window}/{shard}}}", self.prefix),
        }
    }

    fn fleet_key(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }

    /// Adds `ids` to `window` to `pipe` as round `round` of this run's deliveries
    /// to it, counted as `count` says. The pipeline must be atomic (`MULTI`): the
    /// count is the sentinel of the ids, so the two go in together or not at all;
    /// and it counts each round once, however often the round is sent. The
    /// window's first round also sets this run's `sending` mark.
    ///
    /// `touched` says which shards this run already wrote to in the window (empty:
    /// none); returns the shards this round writes to first, for the caller to add
    /// once Redis took the round.
    pub fn queue_ids(
        &self,
        pipe: &mut redis::Pipeline,
        window: WindowStart,
        ids: &[i64],
        round: u64,
        count: Count,
        touched: &[bool],
    ) -> Vec<usize> {
        // A key gets its time to live when this run first writes to it; a key
        // recreated later (Redis lost it) is written again by a replay, which
        // starts over with nothing touched.
        let first = round == 1 || count == Count::Set;
        let ttl_secs = if first { self.key_ttl_secs } else { 0 };
        let mut new_shards = Vec::new();
        for (shard, ids) in self.split(ids).iter().enumerate() {
            if ids.is_empty() {
                continue;
            }
            let key = self.shard_key(window, shard);
            for chunk in ids.chunks(SADD_IDS) {
                pipe.cmd("SADD").arg(&key).arg(chunk).ignore();
            }
            if !touched.get(shard).copied().unwrap_or(false) {
                pipe.cmd("EXPIRE").arg(&key).arg(self.key_ttl_secs).ignore();
                new_shards.push(shard);
            }
        }
        pipe.cmd("EVAL")
            .arg(self.count)
            .arg(2)
            .arg(self.window_key(window, ":delivered"))
            .arg(self.window_key(window, ":rounds"))
            .arg(&self.run)
            .arg(round)
            .arg(ids.len())
            .arg(match count {
                Count::Add => "add",
                Count::Set => "set",
            })
            .arg(ttl_secs)
            .ignore();
        if first {
            let marks = self.window_key(window, ":marks");
            pipe.cmd("HSET")
                .arg(&marks)
                .arg(&self.run)
                .arg("sending")
                .ignore();
            pipe.cmd("EXPIRE")
                .arg(&marks)
                .arg(self.key_ttl_secs)
                .ignore();
        }
        new_shards
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

    /// Tells the fleet this run is alive for another `wait`, learns who is live,
    /// notices when Redis lost its data (the epoch changed), and returns the windows
    /// stopped runs left to the fleet. Once this run has left, it only reads the
    /// epoch: it must not come back to life in the registry.
    pub fn heartbeat(&mut self, connection: &mut Connection) -> RedisResult<Vec<WindowStart>> {
        if self.left {
            let epoch: Option<String> = redis::cmd("GET")
                .arg(self.fleet_key("epoch"))
                .query(connection)?;
            self.learn_epoch(epoch.unwrap_or_default());
            return Ok(Vec::new());
        }
        let (epoch, live, orphans, shards): (String, Vec<String>, Vec<u64>, usize) = self
            .heartbeat
            .key(self.fleet_key("instances"))
            .key(self.fleet_key("joined"))
            .key(self.fleet_key("left"))
            .key(self.fleet_key("epoch"))
            .key(self.fleet_key("orphans"))
            .key(self.fleet_key("shards"))
            .arg(&self.run)
            .arg(self.wait.as_millis() as u64)
            .arg(self.first_window.unix_secs())
            // Distinct each time: the same run may create it again after a loss.
            .arg(format!("{}@{}", self.run, now_ms()))
            .arg(LEFT_REMEMBERED.as_millis() as u64)
            .arg(self.shards)
            .invoke(connection)?;
        if shards != self.shards {
            let refusal = format!(
                "VERVE_REDIS_SHARDS is {} here but {shards} in the fleet sharing this Redis \
                 (prefix {}): every instance must split windows the same way, or ids would \
                 be counted twice; set it to {shards}",
                self.shards, self.prefix
            );
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

    /// Redis lost its data: for a heartbeat lifetime, every instance seen live
    /// lately (even one whose heartbeat had just expired: it may be cut off, with
    /// ids on the way) is waited for, whatever the registry says.
    pub fn lost_data(&mut self) {
        self.remembered.extend(self.seen.keys().cloned());
        self.remembered.sort();
        self.remembered.dedup();
        self.uncertain_until = Some(Instant::now() + self.wait);
    }

    /// Whether a loss of Redis's data was noticed less than a heartbeat lifetime ago.
    pub fn is_uncertain(&mut self) -> bool {
        if self
            .uncertain_until
            .is_some_and(|until| Instant::now() >= until)
        {
            self.uncertain_until = None;
            self.remembered.clear();
        }
        self.uncertain_until.is_some()
    }

    /// Leaves the fleet (shutdown), leaving `unfinished` windows to it: whoever
    /// settles them takes them off the list.
    pub fn leave(
        &mut self,
        connection: &mut Connection,
        unfinished: &[WindowStart],
    ) -> RedisResult<()> {
        let mut call = self.leave.prepare_invoke();
        for name in ["instances", "joined", "left", "orphans"] {
            call.key(self.fleet_key(name));
        }
        call.arg(&self.run);
        for window in unfinished {
            call.arg(window.unix_secs());
        }
        call.invoke::<()>(connection)?;
        self.left = true;
        Ok(())
    }

    /// Records that the shared sinks acknowledged `revision` of `window`.
    pub fn ack(
        &self,
        connection: &mut Connection,
        window: WindowStart,
        revision: u64,
    ) -> RedisResult<()> {
        self.ack
            .key(self.window_key(window, ":record"))
            .arg(revision)
            .invoke(connection)
    }

    /// Marks this instance done with `window` (unless it took no part in it) and
    /// publishes the window if the fleet is done with it, or as `force` says.
    pub fn settle(
        &mut self,
        connection: &mut Connection,
        window: WindowStart,
        view: &WindowView,
        force: Force,
    ) -> RedisResult<Settled> {
        let mut awaited = match self.is_uncertain() {
            true => self.remembered.clone(),
            false => Vec::new(),
        };
        awaited.extend(view.members.iter().cloned());
        let mut call = self.settle.prepare_invoke();
        call.key(self.shard_key(window, 0));
        for part in [":marks", ":delivered", ":record"] {
            call.key(self.window_key(window, part));
        }
        for name in ["instances", "joined", "left", "epoch", "orphans"] {
            call.key(self.fleet_key(name));
        }
        for shard in 1..self.shards {
            call.key(self.shard_key(window, shard));
        }
        call.arg(&self.run)
            .arg(match view.coverage {
                Some(Coverage::Full) => "full",
                Some(Coverage::Partial) => "partial",
                None => "",
            })
            .arg(view.delivered)
            .arg(match force {
                Force::No => "0",
                Force::Yes => "1",
                Force::IfAlone => "alone",
            })
            .arg(window.unix_secs())
            .arg(self.key_ttl_secs)
            .arg(self.epoch.as_deref().unwrap_or_default());
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
            None => call
                .arg(0)
                .arg(0)
                .arg(0)
                .arg(0)
                .arg(0)
                .arg(0)
                .arg(0)
                .arg(""),
        };
        for instance in &awaited {
            call.arg(instance);
        }
        let (head, tail): (SettledHead, SettledTail) = call.invoke(connection)?;
        let (outcome, revision, unique_requests, complete, partial, instances, at) = head;
        let (by, count, done, members, acked, publisher_live, publisher_left_ms) = tail;
        let outcome = match outcome.as_str() {
            "epoch" => Outcome::Epoch,
            "lost" => Outcome::Lost,
            "published" => Outcome::Published,
            _ => Outcome::Unchanged,
        };
        let record = (revision > 0).then_some(Published {
            revision,
            unique_requests,
            complete: complete == 1,
            partial: partial == 1,
            instances,
            published_at_ms: at,
            by,
        });
        Ok(Settled {
            outcome,
            record,
            count,
            done,
            members,
            acked,
            publisher_live: publisher_live == 1,
            publisher_left_ms,
        })
    }

    /// Whether the fleet's wait for `window` is over (by this host's clock).
    pub fn is_wait_over(&self, window: WindowStart) -> bool {
        let end = window.unix_secs() + self.window_secs;
        now_ms() >= end * 1000 + self.wait.as_millis() as u64
    }

    /// Warns when Redis may evict keys: an evicted window set would be counted short.
    /// Users without the right to read the configuration are simply not warned.
    pub fn check_eviction_policy(connection: &mut Connection) {
        let policy: RedisResult<Vec<String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("maxmemory-policy")
            .query(connection);
        match policy.as_deref() {
            Ok([_, policy]) if policy != "noeviction" => tracing::warn!(
                policy = %policy,
                "Redis may evict keys (maxmemory-policy is not noeviction): a window's ids \
                 evicted before its close are counted short; set maxmemory-policy noeviction"
            ),
            Ok(_) => {}
            Err(error) => tracing::debug!(%error, "cannot read Redis's maxmemory-policy"),
        }
    }
}

/// `settle.lua`'s answer, in two parts (redis-rs reads tuples of at most 12).
type SettledHead = (String, u64, u64, u8, u8, u64, u64);
type SettledTail = (String, u64, u64, Vec<String>, u64, u8, u64);

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
