//! Retry throttling that follows how retries fare (gRPC's gRFC A6): a cluster holds a bucket
//! of tokens; an attempt that fails in a way its route would retry takes a whole token, an
//! attempt that succeeds gives back a tenth of one, and retries are allowed only while the
//! bucket is more than half full.
//!
//! The retry budget bounds retries as a share of traffic, which still lets a fifth more load
//! onto a cluster whose every endpoint is failing. The throttle closes that gap: once failures
//! outweigh successes ten to one the bucket drains below half and retries stop, so upstream
//! attempts fall to the client's requests. A few failures among many successes (one flaky
//! endpoint of three) never bring it that low, and those retries go on hiding them.

use std::sync::atomic::{AtomicU64, Ordering};

/// In thousandths of a token, so that a tenth is a whole number.
const MILLI: u64 = 1000;
/// 100 tokens: up to about 50 retries can go out in a sudden total outage before it closes.
pub const MAX_TOKENS: u64 = 100 * MILLI;
/// What a success gives back.
pub const SUCCESS_REFILL: u64 = MILLI / 10;
const FAILURE_COST: u64 = MILLI;

#[derive(Debug)]
pub struct RetryThrottle {
    tokens: AtomicU64,
}

impl Default for RetryThrottle {
    fn default() -> Self {
        RetryThrottle {
            tokens: AtomicU64::new(MAX_TOKENS),
        }
    }
}

impl RetryThrottle {
    /// Records one attempt's outcome: `failed` when it failed in a way its route retries.
    pub fn record(&self, failed: bool) {
        let _ = self
            .tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(if failed {
                    t.saturating_sub(FAILURE_COST)
                } else {
                    (t + SUCCESS_REFILL).min(MAX_TOKENS)
                })
            });
    }

    /// Whether a retry may go out now.
    pub fn allows(&self) -> bool {
        self.tokens.load(Ordering::Relaxed) > MAX_TOKENS / 2
    }

    /// Tokens left, for `/config`.
    pub fn tokens(&self) -> f64 {
        self.tokens.load(Ordering::Relaxed) as f64 / MILLI as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_total_outage_closes_it_after_about_fifty_failures() {
        let t = RetryThrottle::default();
        let mut retries = 0;
        for _ in 0..1000 {
            t.record(true);
            if t.allows() {
                retries += 1;
            }
        }
        assert_eq!(retries, 49, "the bucket falls to half after 50 failures");
        // Nothing but failures: it stays shut, whatever the volume.
        assert!(!t.allows());
    }

    #[test]
    fn one_failure_in_thirty_never_closes_it() {
        let t = RetryThrottle::default();
        for i in 0..100_000u32 {
            t.record(i % 30 == 0);
            assert!(t.allows(), "closed at attempt {i}");
        }
    }

    #[test]
    fn successes_reopen_it() {
        let t = RetryThrottle::default();
        for _ in 0..200 {
            t.record(true);
        }
        assert!(!t.allows());
        // From empty, 50 tokens back is 500 successes; then one more tips it over half.
        for _ in 0..500 {
            t.record(false);
        }
        assert!(!t.allows(), "exactly half is not more than half");
        t.record(false);
        assert!(t.allows());
    }
}
