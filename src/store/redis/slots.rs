//! Where a window's shards land in a Redis Cluster: hash tags whose slots are
//! spread evenly over the 16384.
//!
//! A cluster's masters own ranges of slots (`redis-cli --cluster create` and
//! rebalancing leave them contiguous). A tag naming only the window and the shard
//! would put its slot anywhere, so in one window a master could hold half the
//! shards and another none. Instead shard `k` of `S` takes the first of the tags
//! `<window>/<k>`, `<window>/<k>/1`, `<window>/<k>/2`, … whose slot falls in the
//! `k`-th of `S` equal slices of the slots: with masters owning contiguous
//! ranges, each holds its share of the shards in every window, give or take the
//! one a range boundary splits. The tags are a pure function of the window, the
//! shard and `S` (every instance finds the same ones); finding one takes `S`
//! tries on average, so a window's tags are found once and kept.

use std::collections::BTreeMap;

use crate::window::WindowStart;

/// Redis Cluster's slots.
const SLOTS: u16 = 16384;

/// Windows whose tags are kept: the open ones and those still being settled.
const WINDOWS_KEPT: usize = 16;

/// The slot of a key with hash tag `tag`, as Redis Cluster computes it.
pub(super) fn slot_of(tag: &str) -> u16 {
    crc16_xmodem(tag.as_bytes()) % SLOTS
}

/// CRC-16/XMODEM (polynomial 0x1021, initial 0): Redis Cluster's key hash.
fn crc16_xmodem(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The shard tags of recent windows.
pub(super) struct ShardTags {
    shards: usize,
    kept: BTreeMap<WindowStart, Vec<String>>,
}

impl ShardTags {
    pub fn new(shards: usize) -> Self {
        ShardTags {
            shards,
            kept: BTreeMap::new(),
        }
    }

    /// The hash tag of shard `shard` of `window`.
    pub fn tag(&mut self, window: WindowStart, shard: usize) -> &str {
        if !self.kept.contains_key(&window) {
            if self.kept.len() >= WINDOWS_KEPT {
                self.kept.pop_first();
            }
            let tags = (0..self.shards)
                .map(|shard| find_tag(window, shard, self.shards))
                .collect();
            self.kept.insert(window, tags);
        }
        &self.kept[&window][shard]
    }
}

/// The first tag of shard `shard` of `window` whose slot is in the shard's slice.
fn find_tag(window: WindowStart, shard: usize, shards: usize) -> String {
    let slice = |slot: u16| (u32::from(slot) * shards as u32 / u32::from(SLOTS)) as usize;
    let plain = format!("{window}/{shard}");
    if slice(slot_of(&plain)) == shard {
        return plain;
    }
    (1u32..)
        .map(|n| format!("{plain}/{n}"))
        .find(|tag| slice(slot_of(tag)) == shard)
        .expect("some suffix lands in every slice")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_the_ones_redis_computes() {
        // CRC-16/XMODEM's check value, and CLUSTER KEYSLOT answers.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("somekey"), 11058);
    }

    #[test]
    fn each_shard_lands_in_its_slice_and_tags_are_stable() {
        let window = WindowStart::from_unix_secs(1_795_000_000);
        let mut tags = ShardTags::new(16);
        for shard in 0..16 {
            let slot = u32::from(slot_of(tags.tag(window, shard)));
            assert_eq!(slot * 16 / u32::from(SLOTS), shard as u32, "shard {shard}");
        }
        // Part of the layout in Redis: these must never change.
        let at = "2026-11-18T11:06:40Z";
        assert_eq!(
            [0, 1, 15].map(|shard| tags.tag(window, shard).to_owned()),
            [
                format!("{at}/0/3"),
                format!("{at}/1"),
                format!("{at}/15/63")
            ]
        );
        assert_eq!(tags.tag(window, 3), find_tag(window, 3, 16));
        assert_eq!(ShardTags::new(1).tag(window, 0), find_tag(window, 0, 1));
    }
}
