//! This run's membership of the fleet: its heartbeat, leaving, and what it
//! remembers of the fleet between heartbeats.
//!
//! A heartbeat (`heartbeat.lua`) registers the run, renews its expiry, reads the
//! fleet's epoch, layout and unfinished windows, and Redis's clock. From it the
//! run learns whether the fleet refuses it (another shard count or window
//! length, [`rules::refusal`]), how far its clock is from Redis's
//! ([`rules::clock_offset_ms`]), and whether Redis lost its data (the epoch
//! changed). Invariants: a run that left never registers again (its heartbeat
//! then only reads the epoch); after a loss, the runs seen live shortly before it
//! are waited for, by every settle for one heartbeat lifetime and then on the
//! windows that began before the loss until they register again
//! ([`rules::lost_with_data`]). The protocol is described in
//! docs/architecture.md ("The fleet protocol", steps 1, 6 and 7).

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use redis::RedisResult;

use super::fleet::Fleet;
use super::rules::{self, Layout, Registered, Remembered};
use crate::record::Timestamp;
use crate::redis_link::RedisLink;
use crate::window::WindowStart;

/// After a loss of Redis's data, instances seen live within this many fleet waits
/// are waited for: a heartbeat lifetime, and one more for an instance cut off.
const SEEN_FOR_WAITS: u32 = 2;

/// A run that left is remembered this long (for a record it published to be sent
/// on only after its shutdown had time to deliver it).
const LEFT_REMEMBERED: Duration = Duration::from_secs(3600);

/// `heartbeat.lua`'s answer: the epoch, the live runs, the unfinished windows,
/// the fleet's shards and window length, and Redis's clock (us).
type HeartbeatAnswer = (String, Vec<String>, Vec<u64>, String, u64, u64);

/// What this run knows of the fleet's members between heartbeats; only the
/// heartbeat and a noticed loss change it.
pub(super) struct Membership {
    /// The window this process started in: it has no ids for earlier ones.
    first_window: WindowStart,
    /// A run whose heartbeat expired stays in the registry this long, in ms, to
    /// be waited for on the windows it was live in: the default key TTL, longer
    /// than any run follows a window (not shortened by the test hook).
    lapsed_kept_ms: u64,
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

impl Membership {
    /// A run's membership at its start, uncertain for `wait`: it cannot know
    /// whether Redis lost data it never saw (a restart replaying its journal
    /// after a `FLUSHALL` would otherwise publish an old window before the runs
    /// that knew its record put it back).
    pub fn new(first_window: WindowStart, lapsed_kept_ms: u64, wait: Duration) -> Self {
        Membership {
            first_window,
            lapsed_kept_ms,
            left: false,
            seen: BTreeMap::new(),
            epoch: None,
            remembered: Vec::new(),
            uncertain_until: Some(Instant::now() + wait),
            remembered_until: None,
        }
    }
}

impl Fleet {
    /// How long the registry's keys live after the last heartbeat that renewed
    /// them: longer than any window key, and than a run that left is remembered.
    pub fn registry_ttl_secs(&self) -> u64 {
        self.key_ttl_secs.max(LEFT_REMEMBERED.as_secs())
    }

    /// Tells the fleet this run is alive, learns who is live, notices when Redis
    /// lost its data (the epoch changed), and returns the windows stopped runs
    /// left to the fleet. Once this run has left, it only reads the epoch: it must
    /// not come back to life in the registry.
    pub fn heartbeat(&mut self, link: &mut RedisLink) -> RedisResult<Vec<WindowStart>> {
        if self.membership.left {
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
            .arg(self.membership.first_window.unix_secs())
            .arg(self.membership.epoch.as_deref().unwrap_or_default())
            .arg(LEFT_REMEMBERED.as_millis() as u64)
            .arg(self.layout().registered_shards())
            .arg(self.membership.lapsed_kept_ms)
            .arg(self.registry_ttl_secs())
            .arg(self.length.as_secs())
            // Tagged distinctly each time: the same run may set it again after a loss.
            .arg(rules::next_epoch(
                self.membership.epoch.as_deref(),
                &format!("{}@{}", self.run, Timestamp::now().unix_millis()),
            ))
            .invoke(link.connection())?;
        let (epoch, live, orphans, shards, window_secs, redis_us) = answer;
        let received_us = unix_micros();
        self.clock_offset_ms = Some(rules::clock_offset_ms(sent_us, received_us, redis_us));
        let fleet = Layout::of_fleet(&shards, window_secs);
        if let Some(refusal) = rules::refusal(self.layout(), fleet, self.keys.prefix()) {
            if self.refusal.is_none() {
                tracing::error!("{refusal}; this instance delivers nothing until it is fixed");
            }
            self.refusal = Some(refusal.clone());
            return Err((redis::ErrorKind::Client, "refused", refusal).into());
        }
        self.refusal = None;
        self.learn_epoch(epoch);
        let now = Instant::now();
        self.live_runs = live.len().max(1);
        for run in live {
            self.membership.seen.insert(run, now);
        }
        let horizon = self.wait * SEEN_FOR_WAITS;
        self.membership
            .seen
            .retain(|_, at| now.duration_since(*at) < horizon);
        Ok(orphans
            .into_iter()
            .map(WindowStart::from_unix_secs)
            .collect())
    }

    /// This run's layout, as the fleet must share it.
    fn layout(&self) -> Layout {
        Layout {
            shards: self.shards,
            window_secs: self.length.as_secs(),
            sets_per_window: true,
        }
    }

    fn learn_epoch(&mut self, epoch: String) {
        if self
            .membership
            .epoch
            .as_ref()
            .is_some_and(|known| *known != epoch)
        {
            tracing::warn!(
                "Redis lost its data (the fleet's epoch key changed); windows are sent again as they are settled"
            );
            self.lost_data();
        }
        self.membership.epoch = Some(epoch);
    }

    /// When the fleet's epoch began, by Redis's clock, as of the last heartbeat.
    pub fn epoch_began_ms(&self) -> Option<u64> {
        rules::epoch_began_ms(self.membership.epoch.as_deref()?)
    }

    /// Whether `epoch` is the one this run learned at its last heartbeat: if not,
    /// Redis lost its data since, and the run must beat before it settles.
    pub fn knows_epoch(&self, epoch: &str) -> bool {
        self.membership.epoch.as_deref() == Some(epoch)
    }

    /// Redis lost its data: for a heartbeat lifetime, every instance seen live
    /// lately (even one whose heartbeat had just expired: it may be cut off, with
    /// ids on the way) is waited for, whatever the registry says; and on the
    /// windows that began before now, until it registers again.
    pub fn lost_data(&mut self) {
        let noticed_in = self.length.window_of(SystemTime::now());
        let membership = &mut self.membership;
        for run in membership.seen.keys() {
            if !membership.remembered.iter().any(|r| r.run == *run) {
                membership.remembered.push(Remembered {
                    run: run.clone(),
                    noticed_in,
                });
            }
        }
        let now = Instant::now();
        membership.uncertain_until = Some(now + self.wait);
        membership.remembered_until = Some(now + Duration::from_millis(membership.lapsed_kept_ms));
    }

    /// This run has no ids for windows before `window` that it has not closed
    /// (the clock jumped forward): registered from the next heartbeat on, so
    /// that the fleet does not wait for it on them.
    pub fn starts_at(&mut self, window: WindowStart) {
        self.membership.first_window = self.membership.first_window.max(window);
    }

    /// Whether a loss of Redis's data was noticed less than a heartbeat lifetime ago.
    pub fn is_uncertain(&mut self) -> bool {
        let membership = &mut self.membership;
        if membership
            .uncertain_until
            .is_some_and(|until| Instant::now() >= until)
        {
            membership.uncertain_until = None;
        }
        if membership
            .remembered_until
            .is_some_and(|until| Instant::now() >= until)
        {
            membership.remembered_until = None;
            membership.remembered.clear();
        }
        membership.uncertain_until.is_some()
    }

    /// The runs remembered from a loss of Redis's data that a settle of `window`
    /// waits for beyond the registry (`registry`, as surveyed): every one for a
    /// heartbeat lifetime after the loss, then those the loss may have cost ids
    /// for the window until they register again ([`rules::lost_with_data`]).
    pub fn awaited_after_loss(
        &mut self,
        registry: &[Registered],
        window: WindowStart,
    ) -> Vec<String> {
        match self.is_uncertain() {
            true => self
                .membership
                .remembered
                .iter()
                .map(|r| r.run.clone())
                .collect(),
            false => rules::lost_with_data(&self.membership.remembered, registry, window)
                .into_iter()
                .map(str::to_owned)
                .collect(),
        }
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
        self.membership.left = true;
        Ok(())
    }
}

/// This host's clock, in us since the epoch.
fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
