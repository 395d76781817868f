//! Circuit-breaker thresholds per cluster: requests and retries in flight. Past a threshold
//! a request fails at once with 503 and `x-outrigger-overloaded`, instead of queueing behind a
//! backend that is already saturated.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub const DEFAULT_MAX_REQUESTS: u64 = 1024;

#[derive(Debug)]
pub struct CircuitBreaker {
    pub max_requests: u64,
    /// `None`: only the retry budget limits retries.
    pub max_retries: Option<u64>,
    requests: AtomicU64,
    retries: AtomicU64,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker::new(DEFAULT_MAX_REQUESTS, None)
    }
}

/// A slot held while a request (or retry) is in flight.
pub struct Slot {
    breaker: Arc<CircuitBreaker>,
    retry: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let counter = if self.retry {
            &self.breaker.retries
        } else {
            &self.breaker.requests
        };
        counter.fetch_sub(1, Ordering::Relaxed);
    }
}

fn take(counter: &AtomicU64, max: u64) -> bool {
    if counter.fetch_add(1, Ordering::Relaxed) >= max {
        counter.fetch_sub(1, Ordering::Relaxed);
        return false;
    }
    true
}

impl CircuitBreaker {
    pub fn new(max_requests: u64, max_retries: Option<u64>) -> Self {
        CircuitBreaker {
            max_requests,
            max_retries,
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        }
    }

    pub fn try_request(self: &Arc<Self>) -> Option<Slot> {
        take(&self.requests, self.max_requests).then(|| Slot {
            breaker: self.clone(),
            retry: false,
        })
    }

    pub fn try_retry(self: &Arc<Self>) -> Option<Slot> {
        take(&self.retries, self.max_retries.unwrap_or(u64::MAX)).then(|| Slot {
            breaker: self.clone(),
            retry: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_and_recovery() {
        let b = Arc::new(CircuitBreaker::new(2, Some(1)));
        let (one, two) = (b.try_request().unwrap(), b.try_request().unwrap());
        assert!(b.try_request().is_none(), "the third request overflows");
        drop(one);
        assert!(b.try_request().is_some(), "a slot freed is a slot to use");
        drop(two);
        let r = b.try_retry().unwrap();
        assert!(b.try_retry().is_none());
        drop(r);
        assert!(b.try_retry().is_some());
    }
}
