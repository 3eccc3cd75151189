//! The chaos test's random numbers: SplitMix64, a small generator whose whole
//! state is one `u64`, so that a seed printed with a failure replays the same
//! schedule and the same client ids on any machine (no crate, no platform RNG).

/// SplitMix64 (Steele, Lea and Flood), as `java.util.SplittableRandom` steps it.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// A generator of its own for stream `n` of this seed (a client thread's ids),
    /// independent of how many numbers the others drew.
    pub fn stream(seed: u64, n: u64) -> Rng {
        let mut mixed = Rng(seed ^ n.wrapping_mul(0xD1B5_4A32_D192_ED03));
        Rng(mixed.next_u64())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0); the modulo bias is far below what matters here.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// A number of milliseconds in `low..=high`.
    pub fn millis(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low + 1)
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn the_first_numbers_of_seed_zero_are_splitmix64s() {
        let mut rng = Rng::new(0);
        assert_eq!(rng.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(rng.next_u64(), 0x6E78_9E6A_A1B9_65F4);
    }
}
