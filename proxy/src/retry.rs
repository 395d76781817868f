//! Retries: which outcomes may be retried, how long to wait, and whether the cluster's retry
//! budget allows another one.
//!
//! The budget is Envoy's: retries in flight may be at most `percent` of the requests in
//! flight, but never fewer than `min_concurrency`. It is on by default (20 %, 10), so a sick
//! backend sees at most about 1.2× its normal load from retries instead of a storm.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::{HeaderMap, Method, StatusCode};

/// Bodies up to this size are kept for replay; a larger request is sent once.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetryOn {
    pub connect_failure: bool,
    pub refused_stream: bool,
    pub reset: bool,
    /// Any 5xx.
    pub server_error: bool,
    /// 502, 503, 504.
    pub gateway_error: bool,
    /// gRPC UNAVAILABLE (14), from headers or a trailers-only response.
    pub grpc_unavailable: bool,
    pub grpc_cancelled: bool,
    pub grpc_deadline_exceeded: bool,
    pub grpc_resource_exhausted: bool,
}

impl RetryOn {
    /// Parses Envoy's `retry_on` names; returns the first it does not know.
    pub fn parse<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<RetryOn, String> {
        let mut on = RetryOn::default();
        for name in names {
            match name.trim() {
                "connect-failure" => on.connect_failure = true,
                "refused-stream" => on.refused_stream = true,
                "reset" => on.reset = true,
                "5xx" => on.server_error = true,
                "gateway-error" => on.gateway_error = true,
                "unavailable" => on.grpc_unavailable = true,
                "cancelled" => on.grpc_cancelled = true,
                "deadline-exceeded" => on.grpc_deadline_exceeded = true,
                "resource-exhausted" => on.grpc_resource_exhausted = true,
                other => return Err(other.to_string()),
            }
        }
        Ok(on)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub retries: u32,
    pub on: RetryOn,
    pub per_try_timeout: Option<Duration>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Retry POST, PATCH and other non-idempotent methods too.
    pub non_idempotent: bool,
}

impl RetryPolicy {
    /// Full jitter: a uniform wait in [0, min(max, base × 2^attempt)]. Spreading retries out
    /// keeps a fleet of clients from hitting a recovering backend in lockstep.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let cap = self
            .backoff_base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.backoff_max);
        cap.mul_f64(fastrand::f64())
    }

    pub fn allows_method(&self, method: &Method) -> bool {
        self.non_idempotent || method.is_idempotent()
    }
}

/// What one attempt came to, as far as retrying is concerned.
pub enum Outcome<'a> {
    ConnectFailed,
    Reset,
    /// The per-try timeout passed.
    TimedOut,
    Response(StatusCode, &'a HeaderMap),
}

pub fn retriable(on: &RetryOn, outcome: &Outcome<'_>) -> bool {
    match outcome {
        Outcome::ConnectFailed => on.connect_failure,
        Outcome::Reset => on.reset || on.refused_stream,
        // As Envoy: a per-try timeout counts as a gateway error.
        Outcome::TimedOut => on.gateway_error || on.server_error,
        Outcome::Response(status, headers) => {
            let code = status.as_u16();
            if (on.server_error && status.is_server_error())
                || (on.gateway_error && matches!(code, 502..=504))
            {
                return true;
            }
            // A gRPC failure before any message comes as a trailers-only response: the
            // status is in the headers.
            match headers
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u8>().ok())
            {
                Some(14) => on.grpc_unavailable,
                Some(1) => on.grpc_cancelled,
                Some(4) => on.grpc_deadline_exceeded,
                Some(8) => on.grpc_resource_exhausted,
                _ => false,
            }
        }
    }
}

#[derive(Debug)]
pub struct RetryBudget {
    pub percent: f64,
    pub min_concurrency: u64,
    active_requests: AtomicU64,
    active_retries: AtomicU64,
}

pub const DEFAULT_BUDGET_PERCENT: f64 = 20.0;
pub const DEFAULT_BUDGET_MIN_CONCURRENCY: u64 = 10;

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget::new(DEFAULT_BUDGET_PERCENT, DEFAULT_BUDGET_MIN_CONCURRENCY)
    }
}

impl RetryBudget {
    pub fn new(percent: f64, min_concurrency: u64) -> Self {
        RetryBudget {
            percent,
            min_concurrency,
            active_requests: AtomicU64::new(0),
            active_retries: AtomicU64::new(0),
        }
    }

    /// Counts a request as active until the guard drops.
    pub fn request(self: &Arc<Self>) -> BudgetGuard {
        self.active_requests.fetch_add(1, Ordering::Relaxed);
        BudgetGuard {
            budget: self.clone(),
            retry: false,
        }
    }

    /// A retry slot, if the budget has one.
    pub fn try_retry(self: &Arc<Self>) -> Option<BudgetGuard> {
        let requests = self.active_requests.load(Ordering::Relaxed) as f64;
        let allowed = ((requests * self.percent / 100.0) as u64).max(self.min_concurrency);
        let retries = self.active_retries.fetch_add(1, Ordering::Relaxed);
        if retries >= allowed {
            self.active_retries.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(BudgetGuard {
            budget: self.clone(),
            retry: true,
        })
    }
}

pub struct BudgetGuard {
    budget: Arc<RetryBudget>,
    retry: bool,
}

impl Drop for BudgetGuard {
    fn drop(&mut self) {
        let counter = if self.retry {
            &self.budget.active_retries
        } else {
            &self.budget.active_requests
        };
        counter.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            retries: 3,
            on: RetryOn::parse(["connect-failure", "gateway-error", "unavailable"]).unwrap(),
            per_try_timeout: None,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            non_idempotent: false,
        }
    }

    #[test]
    fn backoff_stays_within_full_jitter_bounds() {
        let p = policy();
        for attempt in 0..10 {
            let cap = Duration::from_millis(25 * (1 << attempt)).min(Duration::from_millis(250));
            for _ in 0..200 {
                assert!(p.backoff(attempt) <= cap, "attempt {attempt}");
            }
        }
        // Full jitter really spreads: some waits are short, some near the cap.
        let waits: Vec<Duration> = (0..500).map(|_| p.backoff(4)).collect();
        assert!(waits.iter().any(|w| *w < Duration::from_millis(50)));
        assert!(waits.iter().any(|w| *w > Duration::from_millis(200)));
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_sleeps_on_the_paused_clock() {
        let p = policy();
        let started = tokio::time::Instant::now();
        let mut total = Duration::ZERO;
        for attempt in 0..3 {
            let wait = p.backoff(attempt);
            total += wait;
            tokio::time::sleep(wait).await;
        }
        // The timer wheel rounds each sleep up to a whole millisecond.
        let elapsed = started.elapsed();
        assert!(
            elapsed >= total && elapsed <= total + Duration::from_millis(3),
            "{elapsed:?} vs {total:?}"
        );
        assert!(total <= Duration::from_millis(25 + 50 + 100));
    }

    #[test]
    fn conditions() {
        let on = policy().on;
        let empty = HeaderMap::new();
        assert!(retriable(&on, &Outcome::ConnectFailed));
        assert!(!retriable(&on, &Outcome::Reset));
        assert!(retriable(
            &on,
            &Outcome::Response(StatusCode::SERVICE_UNAVAILABLE, &empty)
        ));
        assert!(!retriable(
            &on,
            &Outcome::Response(StatusCode::INTERNAL_SERVER_ERROR, &empty)
        ));
        let mut grpc = HeaderMap::new();
        grpc.insert("grpc-status", "14".parse().unwrap());
        assert!(retriable(&on, &Outcome::Response(StatusCode::OK, &grpc)));
        grpc.insert("grpc-status", "5".parse().unwrap());
        assert!(!retriable(&on, &Outcome::Response(StatusCode::OK, &grpc)));
        assert_eq!(RetryOn::parse(["sometimes"]), Err("sometimes".into()));
    }

    #[test]
    fn only_idempotent_methods_unless_opted_in() {
        let mut p = policy();
        assert!(p.allows_method(&Method::GET) && p.allows_method(&Method::PUT));
        assert!(!p.allows_method(&Method::POST));
        p.non_idempotent = true;
        assert!(p.allows_method(&Method::POST));
    }

    #[test]
    fn budget_is_a_share_of_active_requests_with_a_floor() {
        let budget = Arc::new(RetryBudget::new(20.0, 2));
        let requests: Vec<_> = (0..20).map(|_| budget.request()).collect();
        // 20 % of 20 active requests is 4.
        let retries: Vec<_> = (0..10).filter_map(|_| budget.try_retry()).collect();
        assert_eq!(retries.len(), 4);
        drop(retries);
        drop(requests);
        // With nothing active, the floor still allows 2.
        let floor: Vec<_> = (0..10).filter_map(|_| budget.try_retry()).collect();
        assert_eq!(floor.len(), 2);
    }
}
