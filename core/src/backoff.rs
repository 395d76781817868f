//! Exponential backoff with jitter: one helper for request retries, xDS reconnects and
//! certificate renewal, so that every wait in the mesh grows and spreads the same way.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(base: Duration, max: Duration) -> Self {
        Backoff { base, max }
    }

    /// The longest wait before try `attempt` (0 for the first retry): `base × 2^attempt`,
    /// at most `max`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        self.base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max)
    }

    /// A uniform wait in [0, ceiling]. Spreading waits over the whole range keeps a fleet of
    /// clients from hitting a recovering server in lockstep.
    pub fn full_jitter(&self, attempt: u32) -> Duration {
        self.ceiling(attempt).mul_f64(fastrand::f64())
    }

    /// A uniform wait in [ceiling / 2, ceiling], where a minimum pause matters more than the
    /// spread (a CA that is failing should not be asked again at once).
    pub fn equal_jitter(&self, attempt: u32) -> Duration {
        self.ceiling(attempt).mul_f64(0.5 + 0.5 * fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_to_the_cap_and_stay_within_the_jitter_range() {
        let b = Backoff::new(Duration::from_millis(25), Duration::from_millis(250));
        assert_eq!(b.ceiling(0), Duration::from_millis(25));
        assert_eq!(b.ceiling(2), Duration::from_millis(100));
        assert_eq!(b.ceiling(40), Duration::from_millis(250));
        for attempt in 0..10 {
            assert!(b.full_jitter(attempt) <= b.ceiling(attempt));
            let e = b.equal_jitter(attempt);
            assert!(e >= b.ceiling(attempt) / 2 && e <= b.ceiling(attempt));
        }
    }
}
