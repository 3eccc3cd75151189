//! The names of the fleet protocol's keys in Redis, and which shard an id goes to.
//!
//! What each key holds is described in docs/architecture.md ("The fleet
//! protocol"). Invariants: every key names, in braces, the Redis Cluster slot it
//! must share (a window's bookkeeping on the window's slot, a shard's set and its
//! sentinel on the shard's slot, the registry on `{fleet}`), so that no script
//! touches two slots; and [`shard_of`] and the shard tags ([`ShardTags`]) are part
//! of the layout in Redis: every instance and every version must compute them
//! alike.

use super::slots::ShardTags;
use crate::config::RedisMode;
use crate::window::WindowStart;

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
pub(super) struct Keys {
    prefix: String,
    shards: usize,
    tags: ShardTags,
    /// Each shard has its own sentinel beside it (a cluster), rather than one for
    /// the whole window (one server: its shards are lost or kept together).
    sentinel_per_shard: bool,
}

impl Keys {
    pub fn new(prefix: &str, shards: usize, mode: RedisMode) -> Self {
        Keys {
            prefix: prefix.to_owned(),
            shards,
            tags: ShardTags::new(shards),
            sentinel_per_shard: mode == RedisMode::Cluster,
        }
    }

    /// What every key starts with (`VERVE_REDIS_PREFIX`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A key of `window`'s bookkeeping, on the window's slot.
    pub fn window(&self, window: WindowStart, part: &str) -> String {
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
    pub fn set(&mut self, window: WindowStart, shard: usize) -> String {
        self.shard_key(window, shard, "")
    }

    /// How many sentinels a window has: one per shard, or one in all.
    pub fn sentinels(&self) -> usize {
        match self.sentinel_per_shard {
            true => self.shards,
            false => 1,
        }
    }

    /// Which sentinel counts the ids of shard `shard`.
    pub fn sentinel_of(&self, shard: usize) -> usize {
        match self.sentinel_per_shard {
            true => shard,
            false => 0,
        }
    }

    /// The sets of `window` whose ids sentinel `sentinel` counts.
    pub fn counted_by(&mut self, window: WindowStart, sentinel: usize) -> Vec<String> {
        match self.sentinel_per_shard {
            true => vec![self.set(window, sentinel)],
            false => (0..self.shards)
                .map(|shard| self.set(window, shard))
                .collect(),
        }
    }

    /// Sentinel `sentinel` of `window`: its deliveries (run -> ids) and rounds
    /// (run -> last round), beside the ids it counts.
    pub fn sentinel(&mut self, window: WindowStart, sentinel: usize) -> [String; 2] {
        match self.sentinel_per_shard {
            true => [":delivered", ":rounds"].map(|part| self.shard_key(window, sentinel, part)),
            false => [":delivered", ":rounds"].map(|part| self.window(window, part)),
        }
    }

    /// A key of the registry, on the fleet's slot.
    pub fn fleet(&self, name: &str) -> String {
        format!("{}:{{fleet}}:{name}", self.prefix)
    }
}

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
