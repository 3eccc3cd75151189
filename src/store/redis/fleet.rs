//! The fleet protocol: how instances sharing a Redis agree on each window's count.
//!
//! Keys, for a window `W` (its start, RFC 3339) and the prefix `P`:
//!
//! - `P:{W}`: the set of the window's ids, filled by every instance with `SADD`.
//! - `P:{W}:marks`: per instance, `sending` (set with its first ids for the window:
//!   the sentinel of its ids) or, once its last `SADD` for the window is
//!   acknowledged, `full` or `partial` (done; whether it ran for the whole window).
//! - `P:{W}:record`: the latest published record: revision, count, complete,
//!   partial, instances, published_at, and which instance published it.
//! - `P:instances`: the live instances, a sorted set scored by when each one's
//!   heartbeat expires (`VERVE_FLEET_WAIT_MS` after it was sent).
//! - `P:epoch`: created once by the first heartbeat, without expiry; only Redis
//!   losing its data makes it change.
//!
//! Every window key expires a few windows after the window (at least five minutes).
//!
//! An instance registers (its first heartbeat) before it accepts an id, when Redis
//! is reachable. An instance done with a window runs `settle.lua`, which marks it
//! done and, if every live instance (read in the script: a list from the last
//! heartbeat could miss one that just joined) and every instance that sent ids to
//! the window is done, publishes the window: its `SCARD`, and a revision one higher
//! than the last, taken together in the script. Until that happens the instance checks again every poll
//! interval; once the fleet's wait is over (`VERVE_FLEET_WAIT_MS` after the window
//! ended), checks publish whatever is there with `complete=false`. Whenever the
//! count grows after that (an instance that was cut off delivers its ids), the next
//! check or done mark publishes a revision. The script publishes for exactly one
//! caller per revision, so each revision reaches the shared sinks once.
//!
//! If Redis loses an instance's ids (a restart without persistence, `FLUSHALL`,
//! eviction), it loses the instance's mark with them: `settle.lua` answers `lost`
//! when the instance is done with the window (or checks it again later), and the
//! instance sends every id of the window again from its local set. The record goes too; each instance passes the
//! latest record it knows, so revisions keep increasing. So do the other instances'
//! marks and heartbeats: for one heartbeat lifetime after noticing a loss (a new
//! epoch, or a lost mark), an instance also waits for every instance it saw live in
//! the two heartbeat lifetimes before it, and for every instance it saw take part
//! in the window, so that none is taken for done, or gone, before it could say so.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use redis::{Connection, RedisResult, Script};

use crate::metrics::now_ms;
use crate::report::{CountRecord, Scope, Timestamp};
use crate::window::WindowStart;

/// Ids per `SADD` command.
const SADD_IDS: usize = 4096;

/// The longest between two heartbeats.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// The longest between two checks of a window the fleet has not finished.
const POLL: Duration = Duration::from_millis(250);

/// After a loss of Redis's data, instances seen live within this many fleet waits
/// are waited for: a heartbeat lifetime, and one more for an instance cut off.
const SEEN_FOR_WAITS: u32 = 2;

/// Whether an instance ran for the whole of a window it is done with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Coverage {
    Full,
    Partial,
}

/// What this instance knows of a window it is done with.
#[derive(Debug, Clone)]
pub(super) struct WindowView {
    pub coverage: Coverage,
    /// This instance sent ids to the window: its mark is their sentinel.
    pub sent: bool,
    /// The latest record seen.
    pub known: Option<Published>,
    /// Every instance seen taking part, waited for even if Redis loses their marks.
    pub members: BTreeSet<String>,
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
    /// Every instance with a mark for the window: done, or still sending.
    pub members: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Redis lost this instance's ids for the window: send them again.
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
    /// The process that published it ([`Fleet::run`]); empty if restored after
    /// Redis lost it.
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

/// This instance's side of the protocol: key names, the script, the live fleet.
pub(super) struct Fleet {
    prefix: String,
    instance: String,
    /// This process, as the publisher of records: distinct from an earlier
    /// process that ran under the same instance name.
    pub run: String,
    /// Window keys live this long, in seconds.
    key_ttl_secs: u64,
    /// `VERVE_FLEET_WAIT_MS`: the heartbeat's time to live, and how long after a
    /// window's end the fleet waits for every instance.
    pub wait: Duration,
    settle: Script,
    /// The live instances, as of the last heartbeat or leave.
    live: Vec<String>,
    /// When each instance was last seen live, for as long as a loss could need it.
    seen: BTreeMap<String, Instant>,
    /// The fleet's epoch at the last heartbeat.
    epoch: Option<String>,
    /// Instances seen live before Redis lost its data, waited for as if still live
    /// until `uncertain_until`.
    remembered: Vec<String>,
    uncertain_until: Option<Instant>,
}

impl Fleet {
    pub fn new(prefix: &str, instance: &str, window_secs: u64, wait: Duration) -> Self {
        Fleet {
            prefix: prefix.to_owned(),
            instance: instance.to_owned(),
            run: format!("{instance}/{}-{}", std::process::id(), now_ms()),
            key_ttl_secs: (window_secs * 5).max(300),
            wait,
            settle: Script::new(include_str!("settle.lua")),
            live: Vec::new(),
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

    fn ids_key(&self, window: WindowStart) -> String {
        // The hash tag keeps a window's keys on one Redis Cluster slot.
        format!("{}:{{{window}}}", self.prefix)
    }

    fn marks_key(&self, window: WindowStart) -> String {
        format!("{}:marks", self.ids_key(window))
    }

    fn record_key(&self, window: WindowStart) -> String {
        format!("{}:record", self.ids_key(window))
    }

    fn registry_key(&self) -> String {
        format!("{}:instances", self.prefix)
    }

    fn epoch_key(&self) -> String {
        format!("{}:epoch", self.prefix)
    }

    /// Adds `ids` to `window` to `pipe`. The window's first round (`first`) also
    /// sets this instance's `sending` mark, the sentinel of its ids: only
    /// `settle.lua` looks at it again, when the instance is done with the window, so
    /// a round costs nothing more than its `SADD`s.
    pub fn queue_ids(
        &self,
        pipe: &mut redis::Pipeline,
        window: WindowStart,
        ids: &[i64],
        first: bool,
    ) {
        let key = self.ids_key(window);
        if first {
            let marks = self.marks_key(window);
            pipe.cmd("HSET")
                .arg(&marks)
                .arg(&self.instance)
                .arg("sending")
                .ignore();
            pipe.cmd("EXPIRE")
                .arg(&marks)
                .arg(self.key_ttl_secs)
                .ignore();
        }
        for chunk in ids.chunks(SADD_IDS) {
            pipe.cmd("SADD").arg(&key).arg(chunk).ignore();
        }
        pipe.cmd("EXPIRE").arg(&key).arg(self.key_ttl_secs).ignore();
    }

    /// Tells the fleet this instance is alive for another `wait`, forgets instances
    /// whose heartbeat expired, learns who is live, and notices when Redis lost its
    /// data (the epoch changed).
    pub fn heartbeat(&mut self, connection: &mut Connection) -> RedisResult<()> {
        let now = now_ms();
        let expires = now + self.wait.as_millis() as u64;
        let (registry, epoch) = (self.registry_key(), self.epoch_key());
        let (live, epoch): (Vec<String>, String) = redis::pipe()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&registry)
            .arg("-inf")
            .arg(now)
            .ignore()
            .cmd("ZADD")
            .arg(&registry)
            .arg(expires)
            .arg(&self.instance)
            .ignore()
            .cmd("ZRANGEBYSCORE")
            .arg(&registry)
            .arg(now)
            .arg("+inf")
            .cmd("SET")
            .arg(&epoch)
            // Distinct each time: the same process may create it again after a loss.
            .arg(format!("{}@{now}", self.run))
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg(&epoch)
            .query(connection)?;
        if self.epoch.as_ref().is_some_and(|known| *known != epoch) {
            tracing::warn!("Redis lost its data (the fleet's epoch key changed); windows in progress are sent again");
            self.lost_data();
        }
        self.epoch = Some(epoch);
        let now = Instant::now();
        for instance in &live {
            self.seen.insert(instance.clone(), now);
        }
        let horizon = self.wait * SEEN_FOR_WAITS;
        self.seen.retain(|_, at| now.duration_since(*at) < horizon);
        self.live = live;
        Ok(())
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

    /// Shortly after Redis lost its data, the instances seen live before it.
    fn still_remembered(&mut self) -> Vec<String> {
        if self
            .uncertain_until
            .is_some_and(|until| Instant::now() >= until)
        {
            self.uncertain_until = None;
            self.remembered.clear();
        }
        self.remembered.clone()
    }

    /// Leaves the fleet (shutdown); returns whether any other instance is still
    /// waited for (live, or seen live shortly before Redis lost its data).
    pub fn leave(&mut self, connection: &mut Connection) -> RedisResult<bool> {
        let registry = self.registry_key();
        self.live = redis::pipe()
            .cmd("ZREM")
            .arg(&registry)
            .arg(&self.instance)
            .ignore()
            .cmd("ZRANGEBYSCORE")
            .arg(&registry)
            .arg(now_ms())
            .arg("+inf")
            .query::<(Vec<String>,)>(connection)?
            .0;
        let remembered = self.still_remembered();
        let others = self.live.iter().chain(&remembered);
        Ok(others.into_iter().any(|other| *other != self.instance))
    }

    /// Marks this instance done with `window` and publishes the window if the fleet
    /// is done with it, or if `force`.
    pub fn settle(
        &mut self,
        connection: &mut Connection,
        window: WindowStart,
        view: &WindowView,
        force: bool,
    ) -> RedisResult<Settled> {
        // The live instances are read by the script itself: a list from the last
        // heartbeat could miss an instance that joined since, ids and all.
        let mut awaited = self.still_remembered();
        awaited.extend(view.members.iter().cloned());
        let mut call = self.settle.prepare_invoke();
        call.key(self.ids_key(window))
            .key(self.marks_key(window))
            .key(self.record_key(window))
            .key(self.registry_key())
            .arg(&self.instance)
            .arg(&self.run)
            .arg(match view.coverage {
                Coverage::Full => "full",
                Coverage::Partial => "partial",
            })
            .arg(flag(view.sent))
            .arg(flag(force))
            .arg(now_ms())
            .arg(self.key_ttl_secs);
        match &view.known {
            Some(known) => call
                .arg(known.revision)
                .arg(known.unique_requests)
                .arg(flag(known.complete))
                .arg(flag(known.partial))
                .arg(known.instances)
                .arg(known.published_at_ms),
            None => call.arg(0).arg(0).arg(0).arg(0).arg(0).arg(0),
        };
        for instance in &awaited {
            call.arg(instance);
        }
        type Reply = (
            String,
            u64,
            u64,
            u8,
            u8,
            u64,
            u64,
            String,
            u64,
            u64,
            Vec<String>,
        );
        let (
            outcome,
            revision,
            unique_requests,
            complete,
            partial,
            instances,
            at,
            by,
            count,
            done,
            members,
        ): Reply = call.invoke(connection)?;
        let outcome = match outcome.as_str() {
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
        })
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

fn flag(on: bool) -> &'static str {
    if on {
        "1"
    } else {
        "0"
    }
}
