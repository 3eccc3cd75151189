//! Settling a window: the survey, `settle.lua`, and what they found.
//!
//! A run done with a window, or following one the fleet has not finished, settles
//! it: a survey (`roster.lua` on the registry, `tally.lua` on every sentinel, in
//! one pipeline), then `settle.lua` on the window's slot, which marks the run
//! done and publishes a revision if the fleet is done with the window, or as
//! [`Force`] says. Invariants: the script publishes for exactly one caller per
//! revision, never a count below the stored record's, and answers `again` when
//! a run became done after the shards were read (the window's generation
//! changed; a loss never brings an old one back); the caller passes the latest
//! record it knows, so that one Redis lost is put back. Who is waited for is
//! decided in `rules` ([`rules::awaited`], [`rules::lost_with_data`]) and by what
//! this run remembers of a loss (`membership`); a window that began within a
//! fleet wait of the epoch is never complete ([`rules::may_be_complete`]). The protocol is described in docs/architecture.md ("The fleet
//! protocol", steps 3 to 6 and 8).

use std::collections::BTreeSet;

use redis::{RedisResult, Value};

use super::fleet::{evalsha, Fleet};
use super::rules::{self, Registered};
use crate::record::{CountRecord, FleetRecord, Timestamp};
use crate::redis_link::RedisLink;
use crate::window::{WindowLength, WindowStart};

/// Records the highest revision the shared sinks acknowledged.
pub(super) const ACK: &str = "\
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

/// A record as stored in Redis: the fleet's record, and who published it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Published {
    pub fleet: FleetRecord,
    /// The run that published it ([`Fleet::run`]).
    pub by: String,
}

impl Published {
    pub fn to_record(&self, window: WindowStart, length: WindowLength) -> CountRecord {
        CountRecord::fleet(window, length, self.fleet)
    }
}

/// `settle.lua`'s answer, in two parts (redis-rs reads tuples of at most 12).
type SettledHead = (String, u64, u64, u8, u8, u64, u64);
type SettledTail = (String, u64, u64, Vec<String>, u64, u8);

impl Fleet {
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
    /// shard). Redis lost some ([`rules::short_shards`]).
    pub fn short_shards(&self, survey: &Survey, delivered: &[u64]) -> Vec<usize> {
        rules::short_shards(
            delivered,
            &survey.counted,
            self.shards,
            self.keys.sentinels(),
            |shard| self.keys.sentinel_of(shard),
        )
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
        let mut awaited = self.awaited_after_loss(&survey.registry, window);
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
            Some(Published { fleet, by }) => call
                .arg(fleet.revision)
                .arg(fleet.unique_requests)
                .arg(u8::from(fleet.complete))
                .arg(u8::from(fleet.partial))
                .arg(fleet.instances)
                .arg(fleet.published_at_ms)
                .arg(view.acked)
                .arg(by),
            None => call.arg(&[0u64; 7][..]).arg(""),
        };
        let began_ms = rules::epoch_began_ms(&survey.epoch);
        let never_complete = !rules::may_be_complete(window, began_ms, self.wait);
        call.arg(rules::first_revision(window, began_ms))
            .arg(u8::from(never_complete))
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
            fleet: FleetRecord {
                revision,
                unique_requests,
                complete: complete == 1,
                partial: partial == 1,
                instances,
                published_at_ms: at,
            },
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
            Some(r) if !publisher_live && r.fleet.revision > acked && r.by != self.run => {
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
        rules::is_wait_over(
            window,
            self.length,
            self.wait,
            Timestamp::now().unix_millis(),
        )
    }
}
