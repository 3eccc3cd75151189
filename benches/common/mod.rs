//! What the hand-written benches (set_growth, ingest) share: their command line
//! and the ids they send.

/// The command line, and whether `cargo bench` ran it (`--bench`) rather than
/// `cargo test --all-targets`, which wants a quick smoke test.
pub struct Args(Vec<String>);

impl Args {
    pub fn from_env() -> Args {
        Args(std::env::args().collect())
    }

    pub fn benching(&self) -> bool {
        self.has("--bench")
    }

    pub fn has(&self, flag: &str) -> bool {
        self.0.iter().any(|a| a == flag)
    }

    /// The word after `flag`, if given.
    pub fn value(&self, flag: &str) -> Option<String> {
        let at = self.0.iter().position(|a| a == flag)?;
        self.0.get(at + 1).cloned()
    }
}

/// The `i`th id of a run in which every id is new: an odd multiplier and an xor
/// make a bijection on u64, so no two `i` give the same id and no table of the
/// ids sent is needed.
pub fn new_id(i: u64) -> i64 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5555) as i64
}
