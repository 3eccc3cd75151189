//! Waits between retries: each twice the last, from a first wait up to a ceiling.
//!
//! Shared by the callback dispatcher, the Redis stream sink and the Redis store's
//! forwarder, which each choose their own first wait and ceiling (and say why
//! beside them). The sequence never ends: how many retries there are, or until
//! when, is the caller's to decide.

use std::time::Duration;

/// The waits of one run of retries, from [`Backoff::next_wait`].
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    ceiling: Duration,
}

impl Backoff {
    pub fn new(first: Duration, ceiling: Duration) -> Self {
        Backoff {
            next: first,
            ceiling,
        }
    }

    /// The wait before the next retry: the first wait, then twice the last one, up
    /// to the ceiling.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (wait * 2).min(self.ceiling);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_ceiling() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let waits: Vec<u64> = (0..6)
            .map(|_| backoff.next_wait().as_millis() as u64)
            .collect();
        assert_eq!(waits, vec![100, 200, 400, 800, 1000, 1000]);
    }
}
