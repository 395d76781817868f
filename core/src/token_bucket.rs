//! Local rate limiting: a token bucket per inbound listener or per route.
//!
//! The bucket is kept as one atomic "theoretical arrival time" (the generic cell rate
//! algorithm), which is a token bucket without a lock or a refill task: each request moves
//! the time on by one emission interval, and the bucket is empty when that time runs more
//! than `burst` intervals ahead of now. The time it runs ahead is also exactly how long the
//! caller should wait, which becomes `Retry-After`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct RateLimiter {
    pub requests_per_second: f64,
    pub burst: u32,
    /// Nanoseconds between two tokens.
    interval: u64,
    /// How far ahead of now the arrival time may run: `burst` tokens' worth.
    tolerance: u64,
    started: Instant,
    /// Nanoseconds since `started`.
    arrival: AtomicU64,
}

impl RateLimiter {
    /// `burst` is the bucket's size: how many requests may arrive at once after a quiet spell.
    pub fn new(requests_per_second: f64, burst: u32) -> Self {
        let interval = (1e9 / requests_per_second).max(1.0) as u64;
        RateLimiter {
            requests_per_second,
            burst,
            interval,
            tolerance: interval * u64::from(burst.max(1)),
            started: Instant::now(),
            arrival: AtomicU64::new(0),
        }
    }

    /// Takes a token, or says how long until one is free.
    pub fn acquire(&self) -> Result<(), Duration> {
        let now = self.started.elapsed().as_nanos() as u64;
        let mut current = self.arrival.load(Ordering::Acquire);
        loop {
            let next = current.max(now) + self.interval;
            if next > now + self.tolerance {
                return Err(Duration::from_nanos(next - now - self.tolerance));
            }
            match self.arrival.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(seen) => current = seen,
            }
        }
    }

    pub fn same_limits(&self, requests_per_second: f64, burst: u32) -> bool {
        self.requests_per_second == requests_per_second && self.burst == burst
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_full_bucket_allows_the_burst_then_the_rate() {
        let limiter = RateLimiter::new(10.0, 5);
        let burst = (0..20).filter(|_| limiter.acquire().is_ok()).count();
        assert_eq!(burst, 5);
        let wait = limiter.acquire().unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        // Over the next 10 seconds, 10 per second get through.
        let mut allowed = 0;
        for _ in 0..1000 {
            tokio::time::advance(Duration::from_millis(10)).await;
            allowed += (0..5).filter(|_| limiter.acquire().is_ok()).count();
        }
        assert!((99..=101).contains(&allowed), "{allowed}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_it_reports_is_enough() {
        let limiter = RateLimiter::new(2.0, 1);
        limiter.acquire().unwrap();
        let wait = limiter.acquire().unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        tokio::time::advance(wait).await;
        assert!(limiter.acquire().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_spell_refills_only_up_to_the_burst() {
        let limiter = RateLimiter::new(100.0, 3);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!((0..10).filter(|_| limiter.acquire().is_ok()).count(), 3);
    }
}
