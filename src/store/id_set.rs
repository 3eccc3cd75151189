//! The set of one window's ids: grows without pausing, at about 11 bytes per id.
//!
//! One big hash table pays its whole rehash at once: 854 ms at 27.7 M ids for
//! `scc::HashSet`, as long for hashbrown, and twice the memory while it copies.
//! This set is a directory of many small tables instead (extendible hashing, as in
//! Dragonfly's dashtable): the leading bits of an id's hash pick a directory entry,
//! the entry names a table, and tables grow and split one at a time. No table holds
//! more than [`SPLIT_BUCKETS`] buckets, so no single insert moves more than the ids
//! of one such table.
//!
//! Memory: a table grows by half when it passes [`MAX_LOAD`] (9/10), so its load
//! stays between 0.6 and 0.9. They do not grow in step: each table is created at
//! a random point of its growth cycle, so across many tables the loads spread over
//! that range and the set holds about `8 / (0.9 × ln 1.5 / 0.5)` = 11 bytes per
//! id, at every size (13.3 only if every table had just grown at once).
//!
//! CPU: the hash is a keyed permutation ([`Scramble`]), and slots hold the
//! scrambled ids, which are their own hashes: no control bytes, no stored hash,
//! and an id is hashed once, on arrival, however often its table grows (moving
//! ids is most of a growing set's work: see [`GROWTH`]). A bucket is
//! eight of them in one cache line, 0 marks a free slot, and the one id that
//! scrambles to 0 is a flag.
//!
//! Invariants: ids are only ever added (never removed), so an id present in a table
//! lies between its home bucket and the first bucket with a free slot, and a
//! bucket's free slots are its last ones; each table keeps a free slot; `len`
//! counts the inserts that found their id new.

use std::hash::BuildHasher;
use std::sync::OnceLock;

use foldhash::SharedSeed;

/// How ids are spread over partition owners ([`crate::partition`]): foldhash,
/// with seeds from the operating system's randomness (through std's
/// `RandomState`), one shared by the process and one per hasher. Clients pick the
/// ids, so the hash must be one they cannot aim collisions at; SipHash, std's
/// default, resists that even when its output leaks, at several times the cost.
/// Foldhash resists it while its seeds stay unknown, and nothing shows them (see
/// `Scramble`, the set's own hash, for why). (Foldhash's own default seeds come
/// from addresses and the time.)
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

/// The free-slot marker. The one id that scrambles to it is kept as a flag.
const FREE: u64 = 0;

/// A table grows once more than this share of its slots is taken (9/10): with
/// eight slots to a bucket, an insert still probes 1.2 buckets on average.
const MAX_LOAD: (usize, usize) = (9, 10);

/// A full table grows to this many times its buckets. Each growth moves all of
/// the table's ids, so this trades memory for moves: a table doubles (and then
/// splits) in 1.7 growths of a half against 3.1 of a quarter, which took a set
/// growing from nothing from about 140 to 100 ns per id (`cargo bench --bench
/// set_growth`, 20 M ids) for 11.1 bytes per id allocated against 10.0; the
/// resident memory at the end moved by less than that (15.3 against 16.0 at
/// 20 M ids, 12.7 against 11.6 at 50 M). Doubling halves the moves again, at
/// 12.8 bytes per id.
const GROWTH: f64 = 1.5;

/// A table that would grow past this many buckets (128 KiB, 16 K slots) splits
/// in two instead, which bounds the work of any one insert: it moves at most
/// about 15 K ids (0.1 to 0.2 ms). Deciding on the size rather than the count of ids keeps the splits
/// as staggered as the tables' sizes: tables of equal counts split at different
/// times, so no batch meets a wave of them.
const SPLIT_BUCKETS: usize = 1 << 11;

/// The directory never takes more leading bits than this (a table past it only
/// grows); 2^24 tables of [`SPLIT_BUCKETS`] buckets is far beyond any window.
const MAX_DEPTH: u32 = 24;

/// Ids are scrambled in chunks of this many, so that their buckets are fetched
/// from memory together rather than one miss after another.
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

/// A keyed permutation of the 64-bit ids: the set stores and places each id by
/// its scrambled form, which is the id's hash and the id at once. So an id is
/// hashed once, when it arrives, and never again when its table grows or splits
/// (the moves that make up most of the set's work), and [`IdSet::for_each`]
/// gets the ids back by undoing it.
///
/// Clients pick the ids, so where they land must not be something a client can
/// aim at: both keys come from the operating system's randomness, one pair per
/// set, and nothing shows the result (a request is answered before its id
/// reaches the set, so no answer's timing depends on where it lands). The rounds
/// are those of SplitMix64's finaliser (every bit of the input moves about half
/// the bits of the output), with a key added between them.
#[derive(Clone, Copy)]
struct Scramble {
    before: u64,
    between: u64,
}

impl Scramble {
    const MUL_1: u64 = 0xbf58_476d_1ce4_e5b9;
    const MUL_2: u64 = 0x94d0_49bb_1331_11eb;
    const INV_1: u64 = inverse(Scramble::MUL_1);
    const INV_2: u64 = inverse(Scramble::MUL_2);

    fn random() -> Scramble {
        Scramble {
            before: random_u64(),
            between: random_u64(),
        }
    }

    #[inline]
    fn apply(self, id: i64) -> u64 {
        let mut x = id as u64 ^ self.before;
        x = (x ^ (x >> 30)).wrapping_mul(Scramble::MUL_1);
        x = x.wrapping_add(self.between);
        x = (x ^ (x >> 27)).wrapping_mul(Scramble::MUL_2);
        x ^ (x >> 31)
    }

    fn undo(self, scrambled: u64) -> i64 {
        let mut x = unshift(scrambled, 31).wrapping_mul(Scramble::INV_2);
        x = unshift(x, 27).wrapping_sub(self.between);
        x = unshift(x.wrapping_mul(Scramble::INV_1), 30);
        (x ^ self.before) as i64
    }
}

/// The multiplicative inverse of an odd `a` modulo 2^64 (Newton's iteration,
/// each step doubling the correct low bits).
const fn inverse(a: u64) -> u64 {
    let mut x = a;
    let mut step = 0;
    while step < 6 {
        x = x.wrapping_mul(2u64.wrapping_sub(a.wrapping_mul(x)));
        step += 1;
    }
    x
}

/// Undoes `x ^ (x >> shift)`.
fn unshift(y: u64, shift: u32) -> u64 {
    let mut x = y;
    let mut known = shift;
    while known < 64 {
        x = y ^ (x >> shift);
        known += shift;
    }
    x
}

/// Eight slots: scrambled ids, then free slots. Slots fill in order and are
/// never emptied, so the free ones are always the bucket's tail.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Bucket([u64; BUCKET_IDS]);

const EMPTY_BUCKET: Bucket = Bucket([FREE; BUCKET_IDS]);

impl Bucket {
    /// Whether a slot holds `x` (not [`FREE`]). All eight are compared, with
    /// no branch on where a scan would stop, which no predictor can guess.
    #[inline]
    fn holds(&self, x: u64) -> bool {
        self.0
            .iter()
            .fold(false, |found, &slot| found | (slot == x))
    }

    #[inline]
    fn is_full(&self) -> bool {
        self.0[BUCKET_IDS - 1] != FREE
    }

    /// Puts `x` in the first free slot of a bucket that is not full: found in
    /// three steps, since the taken slots are a prefix.
    #[inline]
    fn push(&mut self, x: u64) {
        let mut taken = 0;
        for step in [4, 2, 1] {
            if self.0[taken + step - 1] != FREE {
                taken += step;
            }
        }
        self.0[taken] = x;
    }

    /// The bucket's scrambled ids.
    #[inline]
    fn taken(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().copied().take_while(|&x| x != FREE)
    }
}

/// One table of the directory: buckets probed linearly from an id's home bucket.
struct Table {
    buckets: Box<[Bucket]>,
    len: usize,
    /// Leading bits shared by every scrambled id of this table, and how many.
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

    /// The home bucket of scrambled id `x`: its low 32 bits scaled to the
    /// bucket count (the leading bits pick the table, so the two never overlap).
    /// It keeps the order of those bits, so a table's ids, read bucket by
    /// bucket, reach a grown table's buckets in about the same order.
    #[inline]
    fn home(&self, x: u64) -> usize {
        (((x & 0xFFFF_FFFF) * self.buckets.len() as u64) >> 32) as usize
    }

    /// Adds scrambled id `x` (not [`FREE`]), whose home bucket is `home`; false
    /// if it was there. The table must have a free slot, which [`MAX_LOAD`] keeps.
    #[inline]
    fn insert(&mut self, x: u64, home: usize) -> bool {
        let mut at = home;
        loop {
            let bucket = &mut self.buckets[at];
            if bucket.holds(x) {
                return false;
            }
            if !bucket.is_full() {
                bucket.push(x);
                self.len += 1;
                return true;
            }
            at = self.next(at);
        }
    }

    /// Whether scrambled id `x` (not [`FREE`]), whose home bucket is `home`, is
    /// in the table: it would lie before the first bucket with a free slot.
    fn contains(&self, x: u64, home: usize) -> bool {
        let mut at = home;
        loop {
            let bucket = &self.buckets[at];
            if bucket.holds(x) {
                return true;
            }
            if !bucket.is_full() {
                return false;
            }
            at = self.next(at);
        }
    }

    /// Adds scrambled id `x`, known not to be in the table (moving ids).
    #[inline]
    fn place(&mut self, x: u64) {
        let mut at = self.home(x);
        while self.buckets[at].is_full() {
            at = self.next(at);
        }
        self.buckets[at].push(x);
        self.len += 1;
    }

    /// Adds every id of `old`, a table this one replaces and has room for at
    /// [`MAX_LOAD`] (so it cannot fill up on the way). Read in bucket order,
    /// the ids' homes here rise in the same order: both tables are walked
    /// front to back, which the hardware prefetches by itself.
    fn refill(&mut self, old: &Table) {
        for x in old.scrambled_ids() {
            self.place(x);
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

    fn scrambled_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.buckets.iter().flat_map(Bucket::taken)
    }
}

/// The ids of one window: a set that only grows. See the module's paragraph.
pub struct IdSet {
    scramble: Scramble,
    /// Entry `i` names the table of the ids whose scrambled form starts with
    /// the `depth` bits of `i`.
    directory: Vec<u32>,
    depth: u32,
    tables: Vec<Table>,
    len: u64,
    /// Whether the id that scrambles to [`FREE`] is in the set.
    holds_free_id: bool,
    /// Picks each new table's starting point in its growth cycle (xorshift).
    stagger: u64,
    /// Growths and splits so far: where an id was located before one may have
    /// moved (see [`IdSet::insert_all`]).
    reshapes: u64,
}

impl IdSet {
    /// An empty set with keys of its own.
    pub fn new() -> IdSet {
        IdSet::with_capacity(0)
    }

    /// An empty set laid out for about `capacity` ids (split into as many tables
    /// as it would have at that size), with keys of its own.
    pub fn with_capacity(capacity: usize) -> IdSet {
        let mut set = IdSet {
            scramble: Scramble::random(),
            directory: Vec::new(),
            depth: 0,
            tables: Vec::new(),
            len: 0,
            holds_free_id: false,
            stagger: random_u64() | 1,
            reshapes: 0,
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
        let x = self.scramble.apply(id);
        let (at, home) = self.locate(x);
        self.insert_located(x, at, home)
    }

    /// Adds every id of `ids`, calling `new` with each that was new, in order;
    /// returns how many were. Faster than one [`IdSet::insert`] each: a chunk's
    /// buckets are prefetched before any is probed, each id located (scrambled,
    /// its table and home bucket found) once for both.
    pub fn insert_all(&mut self, ids: &[i64], mut new: impl FnMut(i64)) -> u64 {
        let before = self.len;
        let mut located = [(0u64, 0usize, 0usize); PREFETCH_CHUNK];
        for chunk in ids.chunks(PREFETCH_CHUNK) {
            for (place, &id) in located.iter_mut().zip(chunk) {
                let x = self.scramble.apply(id);
                let (at, home) = self.locate(x);
                prefetch(&self.tables[at].buckets[home]);
                *place = (x, at, home);
            }
            let reshapes = self.reshapes;
            for (&(x, at, home), &id) in located.iter().zip(chunk) {
                // A table that grew or split since has other homes, or ids moved
                // to a new table: locate again (rare, and only in this chunk).
                let (at, home) = match self.reshapes == reshapes {
                    true => (at, home),
                    false => self.locate(x),
                };
                if self.insert_located(x, at, home) {
                    new(id);
                }
            }
        }
        self.len - before
    }

    pub fn contains(&self, id: i64) -> bool {
        let x = self.scramble.apply(id);
        if x == FREE {
            return self.holds_free_id;
        }
        let (at, home) = self.locate(x);
        self.tables[at].contains(x, home)
    }

    /// Calls `f` with every id, in no particular order.
    pub fn for_each(&self, mut f: impl FnMut(i64)) {
        if self.holds_free_id {
            f(self.scramble.undo(FREE));
        }
        for table in &self.tables {
            table.scrambled_ids().for_each(|x| f(self.scramble.undo(x)));
        }
    }

    /// Bytes the set has allocated: its buckets, directory and table list.
    pub fn allocated_bytes(&self) -> usize {
        let buckets: usize = self.tables.iter().map(|t| t.buckets.len()).sum();
        buckets * size_of::<Bucket>()
            + self.tables.capacity() * size_of::<Table>()
            + self.directory.capacity() * size_of::<u32>()
    }

    /// The directory entry of scrambled id `x`: its leading `depth` bits.
    #[inline]
    fn entry(&self, x: u64) -> usize {
        // Two shifts, so that a depth of 0 gives entry 0 rather than overflowing.
        (x >> 32 >> (32 - self.depth)) as usize
    }

    /// Scrambled id `x`'s table and its home bucket there.
    #[inline]
    fn locate(&self, x: u64) -> (usize, usize) {
        let at = self.directory[self.entry(x)] as usize;
        (at, self.tables[at].home(x))
    }

    /// Adds scrambled id `x`, located at table `at` and bucket `home` with the
    /// tables as they are; true if it was new.
    #[inline(always)]
    fn insert_located(&mut self, x: u64, at: usize, home: usize) -> bool {
        if x == FREE {
            let new = !self.holds_free_id;
            self.holds_free_id = true;
            self.len += u64::from(new);
            return new;
        }
        let table = &mut self.tables[at];
        if !table.insert(x, home) {
            return false;
        }
        self.len += 1;
        if table.is_over_load() {
            self.grow(at);
        }
        true
    }

    /// Moves every id of a split table's `old` self into the table the directory
    /// names for it. Going through the directory for each id keeps it in its
    /// right table even when one filled by the move grows or splits in turn (an
    /// uneven split). Both new tables are filled front to back, as in
    /// [`Table::refill`].
    fn move_ids(&mut self, old: &Table) {
        for x in old.scrambled_ids() {
            let at = self.directory[self.entry(x)] as usize;
            self.tables[at].place(x);
            if self.tables[at].is_over_load() {
                // An uneven split: rare, and an ordinary growth.
                self.grow(at);
            }
        }
    }

    /// Table `at` passed its load: it grows by half, or splits in two if
    /// that would take it past [`SPLIT_BUCKETS`]. Either moves all its ids.
    fn grow(&mut self, at: usize) {
        self.reshapes += 1;
        let table = &self.tables[at];
        let buckets = (table.buckets.len() as f64 * GROWTH).ceil() as usize;
        if buckets > SPLIT_BUCKETS && table.depth < MAX_DEPTH {
            self.split(at);
            return;
        }
        let grown = Table::with_buckets(buckets, table.prefix, table.depth);
        let old = std::mem::replace(&mut self.tables[at], grown);
        self.tables[at].refill(&old);
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

    /// A random point in a growth cycle: GROWTH^u for u uniform in [0, 1).
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
    fn the_id_that_scrambles_to_the_free_marker_is_counted_once_and_listed() {
        let mut set = IdSet::new();
        let marker = set.scramble.undo(FREE);
        assert_eq!(set.scramble.apply(marker), FREE);
        assert!(!set.contains(marker));
        assert!(set.insert(marker));
        assert!(!set.insert(marker));
        assert!(set.insert(7));
        assert_eq!(set.len(), 2);
        assert!(set.contains(marker));
        let mut seen = Vec::new();
        set.for_each(|id| seen.push(id));
        seen.sort();
        let mut expected = vec![marker, 7];
        expected.sort();
        assert_eq!(seen, expected);
    }

    #[test]
    fn a_bucket_fills_its_slots_in_order() {
        let mut bucket = EMPTY_BUCKET;
        for x in 1..=BUCKET_IDS as u64 {
            assert!(!bucket.is_full());
            bucket.push(x * 10);
            assert_eq!(
                bucket.taken().collect::<Vec<_>>(),
                (1..=x).map(|x| x * 10).collect::<Vec<_>>()
            );
            assert!(bucket.holds(x * 10) && !bucket.holds(x * 10 + 1));
        }
        assert!(bucket.is_full());
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

    /// From 300 K ids on: below that a set has a few dozen tables, and the
    /// average over them swings with each one's growth (up to 11.8 bytes per id
    /// at 131 K ids in 85 runs; from 300 K on, at most 11.5).
    #[test]
    fn holds_at_most_twelve_bytes_per_id_from_three_hundred_thousand_ids_on() {
        let input = ids(2_000_000, u64::MAX);
        let mut set = IdSet::new();
        for (i, chunk) in input.chunks(512).enumerate() {
            set.insert_all(chunk, |_| {});
            if set.len() >= 300_000 && i % 64 == 0 {
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
        fn scrambling_is_undone_exactly(id in any::<i64>(), before in any::<u64>(), between in any::<u64>()) {
            let scramble = Scramble { before, between };
            prop_assert_eq!(scramble.undo(scramble.apply(id)), id);
        }

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
