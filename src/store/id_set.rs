//! The set of one window's ids: grows without pausing, at about 10 bytes per id.
//!
//! One big hash table pays its whole rehash at once: 854 ms at 27.7 M ids for
//! `scc::HashSet`, as long for hashbrown, and twice the memory while it copies.
//! This set is a directory of many small tables instead (extendible hashing, as in
//! Dragonfly's dashtable): the leading bits of an id's hash pick a directory entry,
//! the entry names a table, and tables grow and split one at a time. No table holds
//! more than [`SPLIT_BUCKETS`] buckets, so no single insert moves more than the ids
//! of one such table.
//!
//! Memory: a table grows by a quarter when it passes [`MAX_LOAD`] (9/10), so its
//! load stays between 0.72 and 0.9: at most 11.1 bytes per id even at the moment
//! every table has just grown. They do not grow in step: each table is created at
//! a random point of its growth cycle, so across many tables the loads spread over
//! that range and the set holds about `8 / (0.9 × ln 1.25 / 0.25)` = 10 bytes per
//! id, at every size. Slots hold ids themselves (no control bytes, no stored hash): a
//! bucket is eight ids in one cache line, 0 marks a free slot, and id 0 is a flag.
//!
//! Invariants: ids are only ever added (never removed), so an id present in a table
//! lies between its home bucket and the first bucket with a free slot; each table
//! keeps a free slot; `len` counts the inserts that found their id new.

use std::hash::BuildHasher;
use std::sync::OnceLock;

use foldhash::SharedSeed;

/// How [`IdSet`] hashes ids: foldhash, with seeds from the operating system's
/// randomness (through std's `RandomState`), one shared by the process and one per
/// set. Clients pick the ids, so the hash must be one they cannot aim collisions
/// at; SipHash, std's default, resists that even when its output leaks, at several
/// times the cost. Foldhash resists it while its seeds stay unknown, and here
/// nothing shows them: a request is answered before its id reaches the set, so no
/// answer's timing depends on where an id lands, and each window's set hashes
/// differently. (Foldhash's own default seeds come from addresses and the time.)
pub type IdHasher = foldhash::fast::SeedableRandomState;

/// A hasher with a seed of its own (and the process's shared seed).
pub fn id_hasher() -> IdHasher {
    static PROCESS_SEED: OnceLock<SharedSeed> = OnceLock::new();
    let shared = PROCESS_SEED.get_or_init(|| SharedSeed::from_u64(random_u64()));
    IdHasher::with_seed(random_u64(), shared)
}

/// 64 bits from the operating system's randomness, through std's `RandomState`.
fn random_u64() -> u64 {
    std::hash::RandomState::new().hash_one(0u8)
}

/// Ids per bucket: one 64-byte cache line.
const BUCKET_IDS: usize = 8;

/// The free-slot marker; the id 0 itself is kept as a flag.
const FREE: i64 = 0;

/// A table grows once more than this share of its slots is taken (9/10): with
/// eight slots to a bucket, an insert still probes 1.2 buckets on average.
const MAX_LOAD: (usize, usize) = (9, 10);

/// A full table grows to this many times its buckets (1.25).
const GROWTH: f64 = 1.25;

/// A table that would grow past this many buckets (128 KiB, 16 K slots) splits
/// in two instead, which bounds the work of any one insert: it moves at most
/// about 15 K ids (0.1 to 0.2 ms). Deciding on the size rather than the count of ids keeps the splits
/// as staggered as the tables' sizes: tables of equal counts split at different
/// times, so no batch meets a wave of them.
const SPLIT_BUCKETS: usize = 1 << 11;

/// The directory never takes more leading hash bits than this (a table past it
/// only grows); 2^24 tables of [`SPLIT_BUCKETS`] buckets is far beyond any window.
const MAX_DEPTH: u32 = 24;

/// Ids are mixed in chunks of this many, so that their buckets are fetched from
/// memory together rather than one miss after another.
const PREFETCH_CHUNK: usize = 16;

/// Asks for `bucket`'s cache line ahead of its use.
#[inline]
fn prefetch(bucket: &Bucket) {
    let line: *const Bucket = bucket;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch only hints the cache; the address is a live bucket.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = line;
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Bucket([i64; BUCKET_IDS]);

const EMPTY_BUCKET: Bucket = Bucket([FREE; BUCKET_IDS]);

impl Bucket {
    /// Bit `i` set where slot `i` holds `id`.
    #[inline]
    fn mask_of(&self, id: i64) -> u32 {
        self.0
            .iter()
            .enumerate()
            .fold(0, |mask, (i, &slot)| mask | (u32::from(slot == id) << i))
    }
}

/// One table of the directory: buckets probed linearly from an id's home bucket.
struct Table {
    buckets: Box<[Bucket]>,
    len: usize,
    /// Leading hash bits shared by every id of this table, and how many.
    prefix: u64,
    depth: u32,
}

impl Table {
    fn with_buckets(buckets: usize, prefix: u64, depth: u32) -> Table {
        Table {
            buckets: vec![EMPTY_BUCKET; buckets.max(1)].into_boxed_slice(),
            len: 0,
            prefix,
            depth,
        }
    }

    /// A table for `ids` ids at `stretch` (1 to [`GROWTH`]) times the buckets
    /// they need at [`MAX_LOAD`]: the point of its growth cycle it starts at.
    fn sized_for(ids: usize, stretch: f64, prefix: u64, depth: u32) -> Table {
        let needed = (ids * MAX_LOAD.1).div_ceil(MAX_LOAD.0 * BUCKET_IDS);
        let buckets = (needed as f64 * stretch).ceil() as usize;
        Table::with_buckets(buckets.max(needed), prefix, depth)
    }

    #[inline]
    fn is_over_load(&self) -> bool {
        self.len * MAX_LOAD.1 > self.buckets.len() * BUCKET_IDS * MAX_LOAD.0
    }

    /// The home bucket of hash `h`: its low 32 bits scaled to the bucket count
    /// (the leading bits pick the table, so the two never overlap).
    #[inline]
    fn home(&self, h: u64) -> usize {
        (((h & 0xFFFF_FFFF) * self.buckets.len() as u64) >> 32) as usize
    }

    /// Adds `id` (not [`FREE`]) with hash `h`; false if it was there. The table
    /// must have a free slot, which [`MAX_LOAD`] keeps.
    #[inline]
    fn insert(&mut self, id: i64, h: u64) -> bool {
        let mut at = self.home(h);
        loop {
            let bucket = &mut self.buckets[at];
            // Whole-bucket masks rather than a slot-by-slot loop: no branch on
            // where in the bucket the scan stops, which no predictor can guess.
            if bucket.mask_of(id) != 0 {
                return false;
            }
            let free = bucket.mask_of(FREE);
            if free != 0 {
                bucket.0[free.trailing_zeros() as usize] = id;
                self.len += 1;
                return true;
            }
            at = self.next(at);
        }
    }

    /// Whether `id` (not [`FREE`]) with hash `h` is in the table: it would lie
    /// before the first bucket with a free slot.
    fn contains(&self, id: i64, h: u64) -> bool {
        let mut at = self.home(h);
        loop {
            let bucket = &self.buckets[at];
            if bucket.mask_of(id) != 0 {
                return true;
            }
            if bucket.mask_of(FREE) != 0 {
                return false;
            }
            at = self.next(at);
        }
    }

    /// Adds `id`, known not to be in the table (moving ids to a new table).
    #[inline]
    fn place(&mut self, id: i64, h: u64) {
        self.place_from(id, self.home(h));
    }

    /// [`Table::place`] with the home bucket already worked out.
    #[inline]
    fn place_from(&mut self, id: i64, home: usize) {
        let mut at = home;
        loop {
            let bucket = &mut self.buckets[at];
            let free = bucket.mask_of(FREE);
            if free != 0 {
                bucket.0[free.trailing_zeros() as usize] = id;
                self.len += 1;
                return;
            }
            at = self.next(at);
        }
    }

    /// Adds every id of `old`, a table this one replaces and has room for at
    /// [`MAX_LOAD`] (so it cannot fill up on the way), a prefetched chunk at a
    /// time: a table just allocated is not in the cache.
    fn refill(&mut self, old: &Table, hasher: &IdHasher) {
        let mut chunk = [(0i64, 0usize); PREFETCH_CHUNK];
        let mut ids = old.ids().peekable();
        while ids.peek().is_some() {
            let mut taken = 0;
            for (slot, id) in chunk.iter_mut().zip(&mut ids) {
                let home = self.home(hasher.hash_one(id));
                prefetch(&self.buckets[home]);
                *slot = (id, home);
                taken += 1;
            }
            for &(id, home) in &chunk[..taken] {
                self.place_from(id, home);
            }
        }
    }

    #[inline]
    fn next(&self, at: usize) -> usize {
        if at + 1 == self.buckets.len() {
            0
        } else {
            at + 1
        }
    }

    fn ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.buckets
            .iter()
            .flat_map(|bucket| bucket.0.iter().copied())
            .filter(|&id| id != FREE)
    }
}

/// The ids of one window: a set that only grows. See the module's paragraph.
pub struct IdSet {
    hasher: IdHasher,
    /// Entry `i` names the table of the ids whose hash starts with the `depth`
    /// bits of `i`.
    directory: Vec<u32>,
    depth: u32,
    tables: Vec<Table>,
    len: u64,
    holds_zero: bool,
    /// Picks each new table's starting point in its growth cycle (xorshift).
    stagger: u64,
}

impl IdSet {
    /// An empty set with a seed of its own.
    pub fn new() -> IdSet {
        IdSet::with_capacity(0)
    }

    /// An empty set laid out for about `capacity` ids (split into as many tables
    /// as it would have at that size), with a seed of its own.
    pub fn with_capacity(capacity: usize) -> IdSet {
        let mut set = IdSet {
            hasher: id_hasher(),
            directory: Vec::new(),
            depth: 0,
            tables: Vec::new(),
            len: 0,
            holds_zero: false,
            stagger: random_u64() | 1,
        };
        // Tables start with as many ids as after a split.
        let split_ids = SPLIT_BUCKETS * BUCKET_IDS * MAX_LOAD.0 / MAX_LOAD.1 / 2;
        let mut depth = 0;
        while capacity >> depth > split_ids && depth < MAX_DEPTH {
            depth += 1;
        }
        let share = capacity >> depth;
        set.depth = depth;
        for prefix in 0..1u64 << depth {
            let stretch = set.next_stretch();
            set.tables
                .push(Table::sized_for(share, stretch, prefix, depth));
            set.directory.push(prefix as u32);
        }
        set
    }

    /// Ids in the set: inserts that found their id new.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `id`; true if it was new.
    pub fn insert(&mut self, id: i64) -> bool {
        let h = self.hasher.hash_one(id);
        self.insert_hashed(id, h)
    }

    /// Adds every id of `ids`, calling `new` with each that was new, in order;
    /// returns how many were. Faster than one [`IdSet::insert`] each: a chunk's
    /// buckets are prefetched before any is probed.
    pub fn insert_all(&mut self, ids: &[i64], mut new: impl FnMut(i64)) -> u64 {
        let before = self.len;
        let mut hashes = [0u64; PREFETCH_CHUNK];
        for chunk in ids.chunks(PREFETCH_CHUNK) {
            for (h, &id) in hashes.iter_mut().zip(chunk) {
                *h = self.hasher.hash_one(id);
                self.prefetch(*h);
            }
            for (&h, &id) in hashes.iter().zip(chunk) {
                if self.insert_hashed(id, h) {
                    new(id);
                }
            }
        }
        self.len - before
    }

    pub fn contains(&self, id: i64) -> bool {
        if id == FREE {
            return self.holds_zero;
        }
        let h = self.hasher.hash_one(id);
        self.tables[self.directory[self.entry(h)] as usize].contains(id, h)
    }

    /// Calls `f` with every id, in no particular order.
    pub fn for_each(&self, mut f: impl FnMut(i64)) {
        if self.holds_zero {
            f(FREE);
        }
        for table in &self.tables {
            table.ids().for_each(&mut f);
        }
    }

    /// Bytes the set has allocated: its buckets, directory and table list.
    pub fn allocated_bytes(&self) -> usize {
        let buckets: usize = self.tables.iter().map(|t| t.buckets.len()).sum();
        buckets * size_of::<Bucket>()
            + self.tables.capacity() * size_of::<Table>()
            + self.directory.capacity() * size_of::<u32>()
    }

    /// The directory entry of hash `h`: its leading `depth` bits.
    #[inline]
    fn entry(&self, h: u64) -> usize {
        // Two shifts, so that a depth of 0 gives entry 0 rather than overflowing.
        (h >> 32 >> (32 - self.depth)) as usize
    }

    #[inline]
    fn insert_hashed(&mut self, id: i64, h: u64) -> bool {
        if id == FREE {
            let new = !self.holds_zero;
            self.holds_zero = true;
            self.len += u64::from(new);
            return new;
        }
        let at = self.directory[self.entry(h)] as usize;
        let table = &mut self.tables[at];
        if !table.insert(id, h) {
            return false;
        }
        self.len += 1;
        if table.is_over_load() {
            self.grow(at);
        }
        true
    }

    #[inline]
    fn prefetch(&self, h: u64) {
        let table = &self.tables[self.directory[self.entry(h)] as usize];
        prefetch(&table.buckets[table.home(h)]);
    }

    /// Moves every id of a split table's `old` self into the table the directory
    /// names for it, with a chunk's buckets prefetched first (tables just
    /// allocated are not in the cache). Going through the directory for each id
    /// keeps it in its right table even when one filled by the move grows or
    /// splits in turn (an uneven split).
    fn move_ids(&mut self, old: &Table) {
        let mut chunk = [(0i64, 0u64); PREFETCH_CHUNK];
        let mut ids = old.ids().peekable();
        while ids.peek().is_some() {
            let mut taken = 0;
            for (slot, id) in chunk.iter_mut().zip(&mut ids) {
                let h = self.hasher.hash_one(id);
                self.prefetch(h);
                *slot = (id, h);
                taken += 1;
            }
            for &(id, h) in &chunk[..taken] {
                let at = self.directory[self.entry(h)] as usize;
                self.tables[at].place(id, h);
                if self.tables[at].is_over_load() {
                    // An uneven split: rare, and an ordinary growth.
                    self.grow(at);
                }
            }
        }
    }

    /// Table `at` passed its load: it grows by a quarter, or splits in two if
    /// that would take it past [`SPLIT_BUCKETS`]. Either moves all its ids.
    fn grow(&mut self, at: usize) {
        let table = &self.tables[at];
        let buckets = (table.buckets.len() as f64 * GROWTH).ceil() as usize;
        if buckets > SPLIT_BUCKETS && table.depth < MAX_DEPTH {
            self.split(at);
            return;
        }
        let grown = Table::with_buckets(buckets, table.prefix, table.depth);
        let old = std::mem::replace(&mut self.tables[at], grown);
        self.tables[at].refill(&old, &self.hasher);
    }

    /// Splits table `at` by the next bit of its ids' hashes into itself and a new
    /// table, doubling the directory first if the table used all its bits.
    fn split(&mut self, at: usize) {
        let (prefix, depth, len) = {
            let table = &self.tables[at];
            (table.prefix, table.depth, table.len)
        };
        if depth == self.depth {
            self.directory = self.directory.iter().flat_map(|&t| [t, t]).collect();
            self.depth += 1;
        }
        let sibling = self.tables.len();
        let (low, high) = (self.next_stretch(), self.next_stretch());
        let old = std::mem::replace(
            &mut self.tables[at],
            Table::sized_for(len / 2, low, prefix << 1, depth + 1),
        );
        self.tables
            .push(Table::sized_for(len / 2, high, prefix << 1 | 1, depth + 1));
        // The table's entries are a run of 2^(depth - its depth); the upper half
        // now names the sibling.
        let run = 1usize << (self.depth - depth);
        let first = (prefix as usize) << (self.depth - depth);
        for entry in &mut self.directory[first + run / 2..first + run] {
            *entry = sibling as u32;
        }
        self.move_ids(&old);
    }

    /// A random point in a growth cycle: 1.25^u for u uniform in [0, 1).
    fn next_stretch(&mut self) -> f64 {
        let x = &mut self.stagger;
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        GROWTH.powf((*x >> 11) as f64 / (1u64 << 53) as f64)
    }
}

impl Default for IdSet {
    fn default() -> Self {
        IdSet::new()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    /// Pseudo-random ids (xorshift), the same every run.
    fn ids(n: usize, range: u64) -> Vec<i64> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % range) as i64
            })
            .collect()
    }

    #[test]
    fn counts_each_id_once_including_zero_and_the_extremes() {
        let mut set = IdSet::new();
        for id in [0, 1, -1, i64::MIN, i64::MAX, 0, 1, i64::MIN] {
            set.insert(id);
        }
        assert_eq!(set.len(), 5);
        assert!(set.contains(0) && set.contains(i64::MIN) && !set.contains(2));
        let mut seen = Vec::new();
        set.for_each(|id| seen.push(id));
        seen.sort();
        assert_eq!(seen, vec![i64::MIN, -1, 0, 1, i64::MAX]);
    }

    #[test]
    fn agrees_with_a_std_set_through_many_splits() {
        let input = ids(300_000, 200_000);
        let mut set = IdSet::new();
        let mut reference = HashSet::new();
        let mut new = Vec::new();
        let counted = set.insert_all(&input, |id| new.push(id));
        let expected: Vec<i64> = input
            .iter()
            .copied()
            .filter(|&id| reference.insert(id))
            .collect();
        assert_eq!(new, expected, "new ids, in input order");
        assert_eq!(counted, reference.len() as u64);
        assert_eq!(set.len(), reference.len() as u64);
        assert!(
            set.tables.len() > 4,
            "split into {} tables",
            set.tables.len()
        );
        let mut all = HashSet::new();
        set.for_each(|id| assert!(all.insert(id), "{id} listed twice"));
        assert_eq!(all, reference);
        assert!(input.iter().all(|&id| set.contains(id)));
        assert!(!set.contains(200_000));
    }

    #[test]
    fn every_directory_entry_names_the_table_of_its_prefix() {
        let mut set = IdSet::new();
        set.insert_all(&ids(200_000, u64::MAX), |_| {});
        for (entry, &table) in set.directory.iter().enumerate() {
            let table = &set.tables[table as usize];
            assert_eq!(entry >> (set.depth - table.depth), table.prefix as usize);
        }
        for table in &set.tables {
            assert!(!table.is_over_load());
            assert!(table.buckets.len() <= SPLIT_BUCKETS);
        }
    }

    #[test]
    fn holds_at_most_twelve_bytes_per_id_from_a_hundred_thousand_ids_on() {
        let input = ids(2_000_000, u64::MAX);
        let mut set = IdSet::new();
        for (i, chunk) in input.chunks(512).enumerate() {
            set.insert_all(chunk, |_| {});
            if set.len() >= 100_000 && i % 64 == 0 {
                let per_id = set.allocated_bytes() as f64 / set.len() as f64;
                assert!(
                    per_id <= 12.0,
                    "{per_id:.2} bytes per id at {} ids",
                    set.len()
                );
            }
        }
    }

    #[test]
    fn a_presized_set_counts_the_same() {
        let input = ids(100_000, 50_000);
        let mut presized = IdSet::with_capacity(60_000);
        assert!(presized.tables.len() > 1);
        let mut grown = IdSet::new();
        presized.insert_all(&input, |_| {});
        grown.insert_all(&input, |_| {});
        assert_eq!(presized.len(), grown.len());
        assert_eq!(
            presized.len(),
            input.iter().collect::<HashSet<_>>().len() as u64
        );
    }

    proptest! {
        #[test]
        fn insert_reports_new_exactly_as_a_std_set_does(
            input in proptest::collection::vec(prop_oneof![any::<i64>(), -50i64..50], 0..3000),
        ) {
            let mut set = IdSet::new();
            let mut reference = HashSet::new();
            for &id in &input {
                prop_assert_eq!(set.insert(id), reference.insert(id));
            }
            prop_assert_eq!(set.len(), reference.len() as u64);
        }
    }
}
