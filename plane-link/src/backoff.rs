//! Capped exponential backoff between reconnect attempts.

use std::time::Duration;

/// Waits that double from `initial` up to `max`.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        let initial = initial.min(max);
        Self {
            initial,
            max,
            next: initial,
        }
    }

    /// The wait before the next attempt; the one after it is twice as long (up to the cap).
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        wait
    }

    /// After a healthy session: the next wait is the initial one again.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }

    /// After a refusal: the next wait is the longest.
    pub fn exhaust(&mut self) {
        self.next = self.max;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_to_the_cap_reset_and_exhaust() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
        let waits: Vec<u128> = (0..5).map(|_| backoff.next_wait().as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 500, 500]);
        backoff.reset();
        assert_eq!(backoff.next_wait(), Duration::from_millis(100));
        backoff.exhaust();
        assert_eq!(backoff.next_wait(), Duration::from_millis(500));
        assert_eq!(backoff.next_wait(), Duration::from_millis(500));
    }

    #[test]
    fn a_cap_below_the_initial_wait_wins() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_millis(10));
        assert_eq!(backoff.next_wait(), Duration::from_millis(10));
    }
}
