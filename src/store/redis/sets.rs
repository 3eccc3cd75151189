//! How many sets each shard of a window is split into, as this run knows it.
//!
//! The number is the window's, not the fleet's: a quiet window needs one set per
//! shard, a busy one thousands, for every set to stay small enough for Redis to
//! keep it as an intset (8 bytes per id rather than about 72). The first round to
//! reach a sentinel since Redis last lost it records the number its run
//! proposed ([`rules::sets_per_shard`] of what the run expects); every later
//! round split another way is refused and learns the recorded one
//! (`round.lua`, `count.lua`). So within a sentinel's life every id of its
//! shards goes to one set, whichever run sends it. Invariant: what is kept here
//! is what Redis answered, or a proposal not yet answered; a forgotten window
//! is proposed again and corrected by Redis's answer.
//!
//! [`rules::sets_per_shard`]: super::rules::sets_per_shard

use std::collections::BTreeMap;

use crate::window::WindowStart;

/// Windows whose numbers are kept: the open ones and those still being settled.
const WINDOWS_KEPT: usize = 16;

/// Per recent window: per sentinel, the sets its shards are split into.
#[derive(Debug, Default)]
pub(super) struct SetCounts {
    windows: BTreeMap<WindowStart, Window>,
}

#[derive(Debug)]
struct Window {
    /// What this run proposes for a sentinel Redis has not answered about.
    proposed: u32,
    /// Per sentinel, what Redis answered (0: not asked yet).
    recorded: Vec<u32>,
}

impl SetCounts {
    /// Whether this run has a number for `window` (recorded or proposed).
    pub fn knows(&self, window: WindowStart) -> bool {
        self.windows.contains_key(&window)
    }

    /// Proposes `sets` per shard for `window`, unless it already has a number.
    pub fn propose(&mut self, window: WindowStart, sets: u32, sentinels: usize) {
        if self.windows.contains_key(&window) {
            return;
        }
        if self.windows.len() >= WINDOWS_KEPT {
            self.windows.pop_first();
        }
        let recorded = vec![0; sentinels];
        let proposed = sets.max(1);
        self.windows.insert(window, Window { proposed, recorded });
    }

    /// The sets per shard of `sentinel`'s shards in `window`: recorded, or
    /// proposed (one, if nothing was).
    pub fn of(&self, window: WindowStart, sentinel: usize) -> u32 {
        match self.windows.get(&window) {
            Some(known) => match known.recorded.get(sentinel) {
                Some(&sets) if sets > 0 => sets,
                _ => known.proposed,
            },
            None => 1,
        }
    }

    /// Redis answered that `sentinel`'s shards in `window` have `sets` sets.
    pub fn record(&mut self, window: WindowStart, sentinel: usize, sets: u32) {
        let known = self.windows.entry(window).or_insert_with(|| Window {
            proposed: sets,
            recorded: Vec::new(),
        });
        if known.recorded.len() <= sentinel {
            known.recorded.resize(sentinel + 1, 0);
        }
        known.recorded[sentinel] = sets;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: WindowStart = WindowStart::from_unix_secs(600);

    #[test]
    fn a_proposal_stands_until_redis_records_another_number() {
        let mut sets = SetCounts::default();
        assert!(!sets.knows(W));
        assert_eq!(sets.of(W, 0), 1);
        sets.propose(W, 64, 2);
        assert!(sets.knows(W));
        assert_eq!([sets.of(W, 0), sets.of(W, 1)], [64, 64]);
        // Another run's proposal reached sentinel 1 first.
        sets.record(W, 1, 16);
        assert_eq!([sets.of(W, 0), sets.of(W, 1)], [64, 16]);
        // A later proposal does not replace the first.
        sets.propose(W, 4, 2);
        assert_eq!(sets.of(W, 0), 64);
    }

    #[test]
    fn only_recent_windows_are_kept() {
        let mut sets = SetCounts::default();
        for n in 0..=WINDOWS_KEPT as u64 {
            sets.propose(WindowStart::from_unix_secs(60 * n), 8, 1);
        }
        assert!(!sets.knows(WindowStart::from_unix_secs(0)));
        assert!(sets.knows(WindowStart::from_unix_secs(60)));
    }
}
