//! Delivering ids: the commands of one round, and this run's `sending` mark.
//!
//! Invariants: a shard's ids go in together with this run's delivered count for
//! the shard (its sentinel), or not at all, and a numbered round is counted once
//! however often it is sent, so that a failover or a restart rolls back ids and
//! count together and a survey can tell that Redis lost some. On a cluster each
//! shard's `round.lua` runs on its node; on one server a round is one
//! transaction of plain `SADD`s and one `count.lua`. Every key a round writes
//! gets its time to live again. A window's first round also marks the run
//! `sending` and notes the window among the fleet's unfinished ones. The
//! protocol is described in docs/architecture.md ("The fleet protocol", steps 2
//! and 6).

use std::borrow::Cow;

use redis::Cmd;

use super::fleet::{evalsha, Fleet};
use super::keys::shard_of;
use crate::window::WindowStart;

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
pub(super) struct RoundCommands {
    pub commands: Vec<Cmd>,
    /// The commands must run as one transaction (`MULTI`).
    pub atomic: bool,
    /// Per shard the round writes to: the shard, and how many ids it adds.
    pub shards: Vec<(usize, u64)>,
}

impl Fleet {
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
