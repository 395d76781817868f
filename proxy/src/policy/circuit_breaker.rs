//! Circuit-breaker thresholds per cluster: requests and retries in flight, and upstream
//! HTTP/1.1 connections with the requests pending for one. Past a threshold a request fails at
//! once with 503 and `x-outrigger-overloaded`, instead of queueing behind a backend that is
//! already saturated.
//!
//! An HTTP/1.1 connection carries one request at a time, so the connection limit is kept as
//! a semaphore of that many permits, held by a request from before it takes a connection
//! from the pool until its response head: a request that finds no permit free is pending, and
//! past `max_pending` of those, the next one overflows. (HTTP/2 multiplexes everything onto
//! one connection per endpoint, so these two limits do not apply to it.)

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use outrigger_core::policy;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Which threshold a request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    Pending,
}

#[derive(Debug)]
pub struct CircuitBreaker {
    pub max_requests: u64,
    /// `None`: only the retry budget limits retries.
    pub max_retries: Option<u64>,
    pub max_connections: u32,
    pub max_pending: u64,
    requests: AtomicU64,
    retries: AtomicU64,
    connections: Arc<Semaphore>,
    pending: AtomicU64,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        CircuitBreaker::new(u64::from(policy::DEFAULT_MAX_REQUESTS), None).with_connections(
            policy::DEFAULT_MAX_CONNECTIONS,
            u64::from(policy::DEFAULT_MAX_PENDING),
        )
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
            max_connections: policy::DEFAULT_MAX_CONNECTIONS,
            max_pending: u64::from(policy::DEFAULT_MAX_PENDING),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            connections: Arc::new(Semaphore::new(policy::DEFAULT_MAX_CONNECTIONS as usize)),
            pending: AtomicU64::new(0),
        }
    }

    pub fn with_connections(mut self, max_connections: u32, max_pending: u64) -> Self {
        self.max_connections = max_connections;
        self.max_pending = max_pending;
        self.connections = Arc::new(Semaphore::new(max_connections as usize));
        self
    }

    /// A connection's worth of capacity: at once if one is free, after waiting as a pending
    /// request if there is room in the queue, or not at all.
    pub async fn connection(&self) -> Result<OwnedSemaphorePermit, Overflow> {
        if let Ok(permit) = self.connections.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if !take(&self.pending, self.max_pending) {
            return Err(Overflow::Pending);
        }
        // Leaves the queue whether the wait ends in a permit or is cancelled by a timeout.
        struct Queued<'a>(&'a AtomicU64);
        impl Drop for Queued<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let _queued = Queued(&self.pending);
        Ok(self
            .connections
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed"))
    }

    /// A connection's worth of capacity now, or none: for what holds a connection for its
    /// whole life (opaque TCP), where queueing would only hold the caller's connection open.
    pub fn try_connection(&self) -> Option<OwnedSemaphorePermit> {
        self.connections.clone().try_acquire_owned().ok()
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

    #[tokio::test(start_paused = true)]
    async fn past_the_connections_requests_wait_and_past_the_pending_they_overflow() {
        let b = Arc::new(CircuitBreaker::new(100, None).with_connections(1, 1));
        let first = b.connection().await.unwrap();
        let waiting = {
            let b = b.clone();
            tokio::spawn(async move { b.connection().await.map(|_| ()) })
        };
        tokio::task::yield_now().await;
        assert_eq!(b.connection().await.unwrap_err(), Overflow::Pending);
        drop(first);
        assert_eq!(
            waiting.await.unwrap(),
            Ok(()),
            "the pending one got the connection"
        );
        assert!(b.connection().await.is_ok(), "and the queue is empty again");
    }

    #[test]
    fn a_tcp_connection_holds_its_place_and_does_not_queue() {
        let b = CircuitBreaker::new(100, None).with_connections(1, 1);
        let held = b.try_connection().unwrap();
        assert!(
            b.try_connection().is_none(),
            "past max_connections, at once"
        );
        drop(held);
        assert!(b.try_connection().is_some());
    }

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
