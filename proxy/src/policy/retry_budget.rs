//! The retry budget: how many retries a cluster can afford, on by default.
//!
//! A retry is allowed only while both bounds hold, with the same two numbers:
//! - over the last second, retries ≤ `percent` of requests, plus `min_per_second`;
//! - in flight, retries ≤ `percent` of requests in flight, but at least `min_per_second`
//!   (Envoy's `retry_budget`, which counts concurrency).
//!
//! The first bound is what stops a storm: when every endpoint fails, upstream attempts stay
//! near (1 + percent) × the client's requests plus the floor, however many retries each
//! route asks for. The second keeps a burst of slow failures from piling retries up. Beside
//! both, the cluster's throttle (`policy/retry_throttle.rs`) stops retries altogether while
//! failures far outweigh successes, so a total outage costs hardly more than no retries.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use outrigger_core::policy;

use crate::policy::retry_throttle::RetryThrottle;

/// The window is split into slots so that it slides in steps of a tenth of a second.
const SLOTS: u64 = 10;
const SLOT: Duration = Duration::from_millis(100);

#[derive(Debug, Default)]
struct Slot {
    /// Which tick this slot's counts belong to; older counts are stale.
    tick: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

#[derive(Debug)]
pub struct RetryBudget {
    pub percent: f64,
    /// Retries per second, and retries in flight, that are always allowed.
    pub min: u64,
    started: Instant,
    slots: [Slot; SLOTS as usize],
    active_requests: AtomicU64,
    active_retries: AtomicU64,
    pub throttle: RetryThrottle,
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget::new(
            policy::DEFAULT_BUDGET_PERCENT,
            u64::from(policy::DEFAULT_BUDGET_MIN_RETRIES),
        )
    }
}

impl RetryBudget {
    pub fn new(percent: f64, min: u64) -> Self {
        RetryBudget {
            percent,
            min,
            started: Instant::now(),
            slots: Default::default(),
            active_requests: AtomicU64::new(0),
            active_retries: AtomicU64::new(0),
            throttle: RetryThrottle::default(),
        }
    }

    fn now_tick(&self) -> u64 {
        // Ticks start at 1 so that a fresh slot (tick 0) is never mistaken for a current one.
        (self.started.elapsed().as_millis() / SLOT.as_millis()) as u64 + 1
    }

    fn current_slot(&self, tick: u64) -> &Slot {
        let slot = &self.slots[(tick % SLOTS) as usize];
        let seen = slot.tick.load(Ordering::Acquire);
        if seen != tick
            && slot
                .tick
                .compare_exchange(seen, tick, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            // A count racing with the reset may be lost; the budget is an estimate anyway.
            slot.requests.store(0, Ordering::Relaxed);
            slot.retries.store(0, Ordering::Relaxed);
        }
        slot
    }

    /// Requests and retries over the last second.
    fn window(&self, tick: u64) -> (u64, u64) {
        self.slots
            .iter()
            .filter(|s| s.tick.load(Ordering::Acquire) + SLOTS > tick)
            .fold((0, 0), |(req, ret), s| {
                (
                    req + s.requests.load(Ordering::Relaxed),
                    ret + s.retries.load(Ordering::Relaxed),
                )
            })
    }

    /// Counts a request, and keeps it active until the guard drops.
    pub fn request(self: &Arc<Self>) -> BudgetGuard {
        self.current_slot(self.now_tick())
            .requests
            .fetch_add(1, Ordering::Relaxed);
        self.active_requests.fetch_add(1, Ordering::Relaxed);
        BudgetGuard {
            budget: self.clone(),
            retry: false,
        }
    }

    /// A retry, if the budget allows one; it counts as in flight until the guard drops.
    pub fn try_retry(self: &Arc<Self>) -> Option<BudgetGuard> {
        if !self.throttle.allows() {
            return None;
        }
        let share = |n: u64| (n as f64 * self.percent / 100.0) as u64;
        let tick = self.now_tick();
        let (requests, retries) = self.window(tick);
        if retries >= share(requests) + self.min {
            return None;
        }
        let in_flight_allowed = share(self.active_requests.load(Ordering::Relaxed)).max(self.min);
        if self.active_retries.fetch_add(1, Ordering::Relaxed) >= in_flight_allowed {
            self.active_retries.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        self.current_slot(tick)
            .retries
            .fetch_add(1, Ordering::Relaxed);
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

    #[tokio::test(start_paused = true)]
    async fn in_flight_retries_are_a_share_of_active_requests_with_a_floor() {
        let budget = Arc::new(RetryBudget::new(20.0, 2));
        let requests: Vec<_> = (0..20).map(|_| budget.request()).collect();
        // 20 % of 20 active requests is 4.
        let retries: Vec<_> = (0..10).filter_map(|_| budget.try_retry()).collect();
        assert_eq!(retries.len(), 4);
        drop(retries);
        drop(requests);
        // A second later the window is empty again, and the floor still allows 2 in flight.
        tokio::time::advance(Duration::from_secs(1)).await;
        let floor: Vec<_> = (0..10).filter_map(|_| budget.try_retry()).collect();
        assert_eq!(floor.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_per_second_are_a_share_of_requests_plus_the_floor() {
        let budget = Arc::new(RetryBudget::new(20.0, 10));
        let mut allowed = 0;
        // 10 seconds of 100 requests per second, each wanting 3 retries, one at a time.
        for _ in 0..10 {
            for _ in 0..10 {
                for _ in 0..10 {
                    let _req = budget.request();
                    for _ in 0..3 {
                        if budget.try_retry().is_some() {
                            allowed += 1;
                        }
                    }
                }
                tokio::time::advance(SLOT).await;
            }
        }
        // 20 % of 1000 requests plus 10 per second; the window slides, so allow a slot's slack.
        assert!((250..=320).contains(&allowed), "{allowed}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_forgets_after_a_second() {
        let budget = Arc::new(RetryBudget::new(0.0, 3));
        let taken = (0..10).filter(|_| budget.try_retry().is_some()).count();
        assert_eq!(taken, 3);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(budget.try_retry().is_none(), "still within the second");
        tokio::time::advance(Duration::from_millis(600)).await;
        assert!(
            budget.try_retry().is_some(),
            "the old retries have slid out"
        );
    }
}
