//! The names of the fleet protocol's keys in Redis, and which shard and set an
//! id goes to.
//!
//! What each key holds is described in docs/architecture.md ("The fleet
//! protocol"). A window's ids are split over shards (`VERVE_REDIS_SHARDS`, each
//! on a slot of its own in a cluster), and each shard's over sets (as many as
//! the window's traffic asks for, recorded beside the shard's sentinel, see
//! `layout`), small enough for Redis to keep them as intsets. Invariants: every
//! key names, in braces, the Redis Cluster slot it must share (a window's
//! bookkeeping on the window's slot, a shard's sets and its sentinel on the
//! shard's slot, the registry on `{fleet}`), so that no script touches two
//! slots; a set's name says how many sets its shard has, so that ids sent under
//! another count than the one recorded are never counted; and [`shard_of`],
//! [`set_of`] and the shard tags ([`ShardTags`]) are part of the layout in
//! Redis: every instance and every version must compute them alike.

use super::slots::ShardTags;
use crate::config::RedisMode;
use crate::window::WindowStart;

/// Which of `shards` sets an id goes to: a fixed multiplicative hash, the same in
/// every instance and every version (it is part of the layout in Redis).
pub(super) fn shard_of(id: i64, shards: usize) -> usize {
    let mixed = (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((mixed >> 32) % shards as u64) as usize
}

/// Which of a shard's `sets` an id goes to: a second fixed hash (a 64-bit
/// finaliser), independent of [`shard_of`]'s, so that the ids of one shard
/// spread over all its sets; part of the layout in Redis like it.
pub(super) fn set_of(id: i64, sets: u32) -> usize {
    let mut x = id as u64;
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    (x % u64::from(sets)) as usize
}

/// The name of set `set` of a shard whose keys start `shard` and that has
/// `sets` sets: the shard's own key when it has one set (the layout before sets
/// were counted per window), else `<shard>:<sets>/<set>`.
pub(super) fn set_name(shard: &str, sets: u32, set: usize) -> String {
    match sets {
        1 => shard.to_owned(),
        _ => format!("{shard}:{sets}/{set}"),
    }
}

/// The keys of `window`'s shards in Redis, under `prefix`, split over `shards`
/// (each shard's sets are named from its key, [`window_sets`]): for operators
/// and tests that look into Redis.
pub fn window_shards(prefix: &str, window: WindowStart, shards: usize) -> Vec<String> {
    let mut keys = Keys::new(prefix, shards, RedisMode::Single);
    (0..shards).map(|shard| keys.shard(window, shard)).collect()
}

/// The keys of the sets of a shard whose key is `shard` and that has `sets`
/// sets (the `sets` field of its sentinel's rounds: `<prefix>:{<window>}:rounds`
/// on one server, `<shard>:rounds` on a cluster).
pub fn window_sets(shard: &str, sets: u32) -> Vec<String> {
    (0..sets as usize)
        .map(|set| set_name(shard, sets, set))
        .collect()
}

/// The key of the set `id` goes to in a window whose shard keys are `shards`
/// ([`window_shards`]), each split over `sets` sets.
pub fn set_of_id(shards: &[String], sets: u32, id: i64) -> String {
    set_name(&shards[shard_of(id, shards.len())], sets, set_of(id, sets))
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

    /// The key of shard `shard` of `window`, which its sets' names start with
    /// ([`set_name`]).
    pub fn shard(&mut self, window: WindowStart, shard: usize) -> String {
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

    /// The shards of `window` whose ids sentinel `sentinel` counts.
    pub fn counted_by(&mut self, window: WindowStart, sentinel: usize) -> Vec<String> {
        match self.sentinel_per_shard {
            true => vec![self.shard(window, sentinel)],
            false => (0..self.shards)
                .map(|shard| self.shard(window, shard))
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

    #[test]
    fn sets_are_fixed_and_spread_a_shards_ids_evenly() {
        // Part of the layout in Redis: these must never change.
        assert_eq!(
            [0, 1, 2, 3, -1, i64::MAX, i64::MIN].map(|id| set_of(id, 1024)),
            [0, 485, 138, 240, 379, 701, 394]
        );
        assert!((-500..500).all(|id| set_of(id, 1) == 0));
        // Ids of one shard, even multiples of a power of two, fill every set.
        let mut per_set = [0u32; 64];
        let ids = (0..2_000_000i64).map(|n| n * 1024);
        for id in ids.filter(|&id| shard_of(id, 4) == 1).take(64_000) {
            per_set[set_of(id, 64)] += 1;
        }
        assert!(
            per_set.iter().all(|&n| (800..1_200).contains(&n)),
            "{per_set:?}"
        );
    }

    #[test]
    fn a_set_is_named_after_its_shard_and_the_shards_count_of_sets() {
        assert_eq!(set_name("v:{w}", 1, 0), "v:{w}");
        assert_eq!(set_name("v:{w}", 256, 17), "v:{w}:256/17");
        let window = WindowStart::from_unix_secs(1_795_000_000);
        let shards = window_shards("v", window, 1);
        assert_eq!(shards, ["v:{2026-11-18T11:06:40Z}"]);
        assert_eq!(
            set_of_id(&shards, 1024, 1),
            "v:{2026-11-18T11:06:40Z}:1024/485"
        );
        assert_eq!(
            window_sets(&shards[0], 2),
            [
                "v:{2026-11-18T11:06:40Z}:2/0",
                "v:{2026-11-18T11:06:40Z}:2/1"
            ]
        );
    }
}
