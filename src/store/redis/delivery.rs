//! Delivering ids: the commands of one round, and this run's `sending` mark.
//!
//! Invariants: a shard's ids go in together with this run's delivered count for
//! the shard (its sentinel), or not at all, and a numbered round is counted once
//! however often it is sent, so that a failover or a restart rolls back ids and
//! count together and a survey can tell that Redis lost some. A round goes in
//! only split into the sets its sentinel records for the window (`sets`); one
//! split another way is refused whole and sent again the recorded way. On a
//! cluster each shard's `round.lua` runs on its node; on one server a round is
//! one transaction of plain `SADD`s and one `count.lua`. Every key a round
//! writes gets its time to live again. A window's first round also marks the run
//! `sending` and notes the window among the fleet's unfinished ones. The
//! protocol is described in docs/architecture.md ("The fleet protocol", steps 2
//! and 6).

use std::borrow::Cow;

use redis::{Cmd, RedisResult, Value};

use super::fleet::{evalsha, Fleet};
use super::keys::{set_name, set_of, shard_of};
use crate::redis_link::RedisLink;
use crate::window::WindowStart;

/// How often a round is sent again split another way before the call fails:
/// each refusal teaches the recorded number, so a second try is refused only
/// if Redis lost the sentinel in between.
const SPLIT_TRIES: usize = 4;

/// How a round counts its ids as this run's deliveries to a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Count {
    /// Adds them to the count: after a loss of Redis's data, the count starts
    /// again from nothing and stays short of what the run delivered.
    Add,
    /// Starts the count again with them (a replay's first round to the shard).
    Set,
}

/// The commands of one round of ids, and what they deliver to each shard.
struct RoundCommands {
    commands: Vec<Cmd>,
    /// Per shard the round writes to: the shard, and how many ids it adds.
    shards: Vec<(usize, u64)>,
    /// Per sentinel the round writes to: the index of its script's answer (0,
    /// or the sets recorded if the round's split is refused), the sentinel,
    /// and the sets per shard the round split its ids into.
    checks: Vec<(usize, usize, u32)>,
}

impl Fleet {
    /// Adds `ids` to `window` as round `round` of this run's deliveries to it,
    /// counted as `count` says, split into the sets the window's sentinels
    /// record (a split they refuse is sent again their way). Returns what went
    /// in, per shard: the shard and its number of ids.
    pub fn deliver(
        &mut self,
        link: &mut RedisLink,
        window: WindowStart,
        ids: &[i64],
        round: u64,
        count: Count,
    ) -> RedisResult<Vec<(usize, u64)>> {
        let mut delivered = Vec::new();
        let mut pending = Cow::Borrowed(ids);
        for _ in 0..SPLIT_TRIES {
            let this = self.round(window, &pending, round, count);
            let mut answers = self.pipeline(link, this.commands, self.atomic)?;
            let mut refused = Vec::new();
            for (answer, sentinel, sets) in this.checks {
                let answer = answers.get_mut(answer).map_or(Value::Nil, std::mem::take);
                let recorded: u32 = redis::from_redis_value(answer)?;
                if recorded == 0 {
                    self.sets.record(window, sentinel, sets);
                } else {
                    self.sets.record(window, sentinel, recorded);
                    refused.push(sentinel);
                }
            }
            let sentinel_of = |shard| self.keys.sentinel_of(shard);
            delivered.extend(
                this.shards
                    .into_iter()
                    .filter(|(shard, _)| !refused.contains(&sentinel_of(*shard))),
            );
            if refused.is_empty() {
                return Ok(delivered);
            }
            let shards = self.shards;
            pending = Cow::Owned(
                pending
                    .iter()
                    .copied()
                    .filter(|&id| refused.contains(&sentinel_of(shard_of(id, shards))))
                    .collect(),
            );
        }
        Err((
            redis::ErrorKind::Client,
            "a window's number of sets kept changing while a round was sent (Redis lost it repeatedly)",
        )
            .into())
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
    fn round(
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
        let mut checks = Vec::new();
        for (shard, ids) in self.split(ids).iter().enumerate() {
            if ids.is_empty() {
                continue;
            }
            let sentinel = self.keys.sentinel_of(shard);
            let sets = self.sets.of(window, sentinel);
            let key = self.keys.shard(window, shard);
            let (ids, groups) = by_set(ids, sets);
            if self.atomic {
                let mut at = 0;
                for &(set, len) in &groups {
                    let set = set_name(&key, sets, set);
                    let mut add = redis::cmd("SADD");
                    add.arg(&set).arg(&ids[at..at + len]);
                    let mut expire = redis::cmd("EXPIRE");
                    expire.arg(&set).arg(ttl);
                    commands.extend([add, expire]);
                    at += len;
                }
            } else {
                let [delivered, rounds] = self.keys.sentinel(window, shard);
                let mut call = evalsha(&self.round, &[key, delivered, rounds]);
                call.arg(&self.run)
                    .arg(round)
                    .arg(mode)
                    .arg(ttl)
                    .arg(sets)
                    .arg(groups.len());
                for &(set, len) in &groups {
                    call.arg(set).arg(len);
                }
                call.arg(&ids[..]);
                checks.push((commands.len(), sentinel, sets));
                commands.push(call);
            }
            shards.push((shard, ids.len() as u64));
        }
        if self.atomic && !shards.is_empty() {
            let ids: u64 = shards.iter().map(|(_, ids)| ids).sum();
            let sets = self.sets.of(window, 0);
            // Sent whole: a script not loaded yet would fail inside the transaction.
            let mut call = redis::cmd("EVAL");
            call.arg(self.count)
                .arg(2)
                .arg(&self.keys.sentinel(window, 0))
                .arg(&self.run)
                .arg(round)
                .arg(mode)
                .arg(ids)
                .arg(ttl)
                .arg(sets);
            checks.push((commands.len(), 0, sets));
            commands.push(call);
        }
        if round == 1 {
            commands.extend(self.sending(window));
        }
        RoundCommands {
            commands,
            shards,
            checks,
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

    /// Which sentinel counts the ids of shard `shard`.
    pub fn sentinel_of(&self, shard: usize) -> usize {
        self.keys.sentinel_of(shard)
    }

    /// How many sentinels a window has.
    pub fn sentinels(&self) -> usize {
        self.keys.sentinels()
    }

    /// `ids` by shard; with one shard, as they are.
    fn split<'a>(&self, ids: &'a [i64]) -> Vec<Cow<'a, [i64]>> {
        if self.shards == 1 {
            return vec![Cow::Borrowed(ids)];
        }
        let mut shards = vec![Vec::new(); self.shards];
        for &id in ids {
            shards[shard_of(id, self.shards)].push(id);
        }
        shards.into_iter().map(Cow::Owned).collect()
    }
}

/// A shard's `ids` grouped by set, for `sets` sets: the ids, set after set, and
/// per set written to, its number and how many of them go to it (a counting
/// sort: two passes, whatever the number of sets).
fn by_set(ids: &[i64], sets: u32) -> (Cow<'_, [i64]>, Vec<(usize, usize)>) {
    if sets == 1 {
        return (Cow::Borrowed(ids), vec![(0, ids.len())]);
    }
    let of: Vec<u32> = ids.iter().map(|&id| set_of(id, sets) as u32).collect();
    let mut starts = vec![0; sets as usize + 1];
    for &set in &of {
        starts[set as usize + 1] += 1;
    }
    let groups = (0..sets as usize)
        .filter(|&set| starts[set + 1] > 0)
        .map(|set| (set, starts[set + 1]))
        .collect();
    for set in 0..sets as usize {
        starts[set + 1] += starts[set];
    }
    let mut grouped = vec![0; ids.len()];
    for (&id, &set) in ids.iter().zip(&of) {
        grouped[starts[set as usize]] = id;
        starts[set as usize] += 1;
    }
    (Cow::Owned(grouped), groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shards_ids_are_grouped_set_by_set() {
        let ids: Vec<i64> = (0..1_000).map(|n| n * 7_919).collect();
        let (grouped, groups) = by_set(&ids, 16);
        assert_eq!(groups.iter().map(|(_, len)| len).sum::<usize>(), 1_000);
        let mut at = 0;
        for &(set, len) in &groups {
            assert!(grouped[at..at + len]
                .iter()
                .all(|&id| set_of(id, 16) == set));
            at += len;
        }
        let mut sorted = grouped.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, ids);
        let (same, one) = by_set(&ids, 1);
        assert_eq!((&same[..], one), (&ids[..], vec![(0, 1_000)]));
    }
}
