//! Outlier detection: an endpoint that keeps failing is ejected from load balancing for a
//! while, instead of receiving its share of traffic and failing it.
//!
//! Triggers: consecutive 5xx, or consecutive gateway failures (502/503/504 and connect
//! failures). An ejection lasts base × (number of ejections), capped, and never more than
//! `max_ejection_percent` of the cluster is ejected at once. When an ejection ends the
//! endpoint is on probation: its next result decides. A success clears its record; a failure
//! ejects it again, for longer.
//!
//! While it is out, an ejected endpoint is probed with one real request at a time: the
//! first 250 ms after the ejection, then backing off to one a second while it keeps failing
//! (a probe that fails is retried elsewhere like any attempt). The first probe that succeeds
//! brings it back at once, not when its timer ends, and it ramps up over `SLOW_START` so that
//! a process that just restarted is not flooded. The timer still ends an ejection for a
//! cluster with too little traffic to probe.
//!
//! The clock is tokio's, so ejection timing is tested on a paused clock. State is atomics on
//! the endpoint; two racing failures may both count, which only makes an ejection a request
//! sooner.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use outrigger_core::policy;
use tokio::time::Instant;

#[derive(Debug, Clone, PartialEq)]
pub struct OutlierPolicy {
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway_failure: Option<u32>,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejection_percent: u32,
}

impl Default for OutlierPolicy {
    fn default() -> Self {
        OutlierPolicy {
            consecutive_5xx: Some(policy::DEFAULT_CONSECUTIVE_5XX),
            consecutive_gateway_failure: Some(policy::DEFAULT_CONSECUTIVE_GATEWAY_FAILURE),
            base_ejection: policy::DEFAULT_BASE_EJECTION,
            max_ejection: policy::DEFAULT_MAX_EJECTION,
            max_ejection_percent: policy::DEFAULT_MAX_EJECTION_PERCENT,
        }
    }
}

/// What one attempt told us about the endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Success,
    /// A 5xx other than a gateway error.
    ServerError,
    /// 502, 503, 504 or a failed connect.
    GatewayFailure,
}

fn now_nanos() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    Instant::now().saturating_duration_since(epoch).as_nanos() as u64 + 1
}

#[derive(Debug, Default)]
pub struct OutlierState {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    ejections: AtomicU32,
    /// 0 when not ejected; else the end of the ejection, in `now_nanos` time.
    ejected_until: AtomicU64,
    /// Ejected before and now back: the next result decides.
    probation: AtomicBool,
    /// While ejected: when the next probe may go, in `now_nanos` time.
    next_probe: AtomicU64,
    /// Probes failed in a row in this ejection, for their backoff.
    probe_failures: AtomicU32,
    /// When it last came back, for slow start (0: not ramping).
    readmitted_at: AtomicU64,
}

/// The first probe after an ejection, and the backoff's cap: about one a second per endpoint.
const FIRST_PROBE: Duration = Duration::from_millis(250);
const PROBE_CAP: Duration = Duration::from_secs(1);
/// How long a returning endpoint takes to reach its full share.
pub const SLOW_START: Duration = Duration::from_secs(3);
/// Its share when it comes back.
const SLOW_START_FLOOR: f64 = 0.1;

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl OutlierState {
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return false;
        }
        if now_nanos() < until {
            return true;
        }
        // The ejection is over: back in, on probation.
        if self
            .ejected_until
            .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.probation.store(true, Ordering::Relaxed);
        }
        false
    }

    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Whether this request may be the ejected endpoint's probe: true for one caller once the
    /// probe is due, which also sets when the next one may go.
    pub fn try_probe(&self) -> bool {
        let due = self.next_probe.load(Ordering::Relaxed);
        let now = now_nanos();
        if due == 0 || now < due || !self.is_ejected() {
            return false;
        }
        // Set as if this probe will fail too; a success ends the ejection anyway.
        let failures = self.probe_failures.load(Ordering::Relaxed) + 1;
        let wait = FIRST_PROBE
            .saturating_mul(1 << failures.min(8))
            .min(PROBE_CAP);
        self.next_probe
            .compare_exchange(
                due,
                now.saturating_add(nanos(wait)),
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
    }

    /// Its share of traffic while it ramps up after coming back: from a tenth to all of it
    /// over `SLOW_START`.
    pub fn slow_start_weight(&self) -> f64 {
        let at = self.readmitted_at.load(Ordering::Relaxed);
        if at == 0 {
            return 1.0;
        }
        let ramp = now_nanos().saturating_sub(at) as f64 / SLOW_START.as_nanos() as f64;
        if ramp >= 1.0 {
            self.readmitted_at.store(0, Ordering::Relaxed);
            return 1.0;
        }
        SLOW_START_FLOOR + (1.0 - SLOW_START_FLOOR) * ramp
    }

    /// A probe (a request while ejected) came back healthy: back in now, ramping up, with the
    /// ejection count kept so that a relapse is ejected for longer.
    fn readmit(&self) {
        self.ejected_until.store(0, Ordering::Relaxed);
        self.next_probe.store(0, Ordering::Relaxed);
        self.probe_failures.store(0, Ordering::Relaxed);
        self.probation.store(true, Ordering::Relaxed);
        self.readmitted_at.store(now_nanos(), Ordering::Relaxed);
    }

    /// Records an attempt's result. `may_eject` says whether the cluster can afford one more
    /// ejection. Returns true when this result ejected the endpoint.
    pub fn observe(&self, policy: &OutlierPolicy, health: Health, may_eject: bool) -> bool {
        if self.is_ejected() {
            // Only a probe reaches an ejected endpoint (or a request begun before it was out).
            match health {
                Health::Success => self.readmit(),
                _ => {
                    self.probe_failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            return false;
        }
        let tripped = match health {
            Health::Success => {
                self.consecutive_5xx.store(0, Ordering::Relaxed);
                self.consecutive_gateway.store(0, Ordering::Relaxed);
                if self.probation.swap(false, Ordering::Relaxed) {
                    self.ejections.store(0, Ordering::Relaxed);
                }
                return false;
            }
            Health::ServerError | Health::GatewayFailure => {
                let fives = self.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
                let gateway = if health == Health::GatewayFailure {
                    self.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1
                } else {
                    self.consecutive_gateway.store(0, Ordering::Relaxed);
                    0
                };
                self.probation.load(Ordering::Relaxed)
                    || policy.consecutive_5xx.is_some_and(|n| fives >= n)
                    || policy
                        .consecutive_gateway_failure
                        .is_some_and(|n| gateway >= n)
            }
        };
        if !tripped || !may_eject || self.is_ejected() {
            return false;
        }
        let count = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let length = policy
            .base_ejection
            .saturating_mul(count)
            .min(policy.max_ejection);
        let now = now_nanos();
        self.ejected_until
            .store(now.saturating_add(nanos(length)), Ordering::Relaxed);
        self.next_probe
            .store(now.saturating_add(nanos(FIRST_PROBE)), Ordering::Relaxed);
        self.probe_failures.store(0, Ordering::Relaxed);
        self.readmitted_at.store(0, Ordering::Relaxed);
        self.probation.store(false, Ordering::Relaxed);
        self.consecutive_5xx.store(0, Ordering::Relaxed);
        self.consecutive_gateway.store(0, Ordering::Relaxed);
        true
    }
}

/// Whether one more of `total` endpoints may be ejected while `ejected` already are.
pub fn may_eject(policy: &OutlierPolicy, ejected: usize, total: usize) -> bool {
    total > 0 && (ejected + 1) * 100 <= total * policy.max_ejection_percent as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> OutlierPolicy {
        OutlierPolicy {
            consecutive_5xx: Some(5),
            consecutive_gateway_failure: Some(3),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_for_base_times_count_capped() {
        let (p, e) = (policy(), OutlierState::default());
        for _ in 0..4 {
            assert!(!e.observe(&p, Health::ServerError, true));
        }
        assert!(
            e.observe(&p, Health::ServerError, true),
            "the fifth 5xx ejects"
        );
        assert!(e.is_ejected());
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(e.is_ejected());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!e.is_ejected(), "30 s × 1 is over");

        // On probation a single failure ejects again, for 30 s × 2.
        assert!(e.observe(&p, Health::GatewayFailure, true));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(e.is_ejected());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!e.is_ejected());

        // The cap: 30 s × 11 would be 330 s; it is 300 s.
        for _ in 0..9 {
            assert!(e.observe(&p, Health::GatewayFailure, true));
            tokio::time::advance(Duration::from_secs(301)).await;
            assert!(!e.is_ejected());
        }
        assert!(e.observe(&p, Health::GatewayFailure, true));
        tokio::time::advance(Duration::from_secs(299)).await;
        assert!(e.is_ejected());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!e.is_ejected());
    }

    #[tokio::test(start_paused = true)]
    async fn a_successful_probe_clears_the_record() {
        let (p, e) = (policy(), OutlierState::default());
        for _ in 0..3 {
            e.observe(&p, Health::GatewayFailure, true);
        }
        assert!(e.is_ejected());
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(!e.is_ejected());
        assert!(!e.observe(&p, Health::Success, true));
        assert_eq!(e.ejections(), 0);
        // Off probation, one failure is just one failure again.
        assert!(!e.observe(&p, Health::GatewayFailure, true));
        assert!(!e.is_ejected());
    }

    fn ejected(p: &OutlierPolicy) -> OutlierState {
        let e = OutlierState::default();
        for _ in 0..3 {
            e.observe(p, Health::GatewayFailure, true);
        }
        assert!(e.is_ejected());
        e
    }

    #[tokio::test(start_paused = true)]
    async fn an_ejected_endpoint_is_probed_with_backoff_to_one_a_second() {
        let p = policy();
        let e = ejected(&p);
        assert!(!e.try_probe(), "not at once");
        let mut gaps = Vec::new();
        let mut since = Duration::ZERO;
        let step = Duration::from_millis(50);
        while gaps.len() < 6 {
            tokio::time::advance(step).await;
            since += step;
            if e.try_probe() {
                assert!(!e.try_probe(), "one probe at a time");
                gaps.push(since.as_millis());
                since = Duration::ZERO;
                e.observe(&p, Health::GatewayFailure, true);
            }
        }
        assert_eq!(gaps, [250, 500, 1000, 1000, 1000, 1000]);
        assert!(e.is_ejected(), "failed probes keep it out");
    }

    #[tokio::test(start_paused = true)]
    async fn a_successful_probe_brings_it_back_at_once_ramping_up() {
        let p = policy();
        let e = ejected(&p);
        tokio::time::advance(Duration::from_millis(250)).await;
        assert!(e.try_probe());
        e.observe(&p, Health::Success, true);
        assert!(!e.is_ejected(), "back long before its 30 s timer");
        assert!((e.slow_start_weight() - 0.1).abs() < 1e-6);
        tokio::time::advance(SLOW_START / 2).await;
        assert!((e.slow_start_weight() - 0.55).abs() < 1e-6);
        tokio::time::advance(SLOW_START / 2).await;
        assert_eq!(e.slow_start_weight(), 1.0);
        // Back on probation: a relapse is ejected for longer (30 s × 2).
        assert!(e.observe(&p, Health::GatewayFailure, true));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(e.is_ejected());
    }

    #[test]
    fn successes_reset_the_count_and_the_share_is_capped() {
        let (p, e) = (policy(), OutlierState::default());
        for _ in 0..10 {
            e.observe(&p, Health::GatewayFailure, true);
            e.observe(&p, Health::GatewayFailure, true);
            e.observe(&p, Health::Success, true);
        }
        assert!(!e.is_ejected());
        assert!(
            !e.observe(&p, Health::GatewayFailure, false)
                && !e.observe(&p, Health::GatewayFailure, false)
        );
        assert!(
            !e.observe(&p, Health::GatewayFailure, false),
            "the cluster cannot afford it"
        );
        assert!(
            may_eject(&p, 0, 3) && !may_eject(&p, 1, 3),
            "50 % of 3 is one endpoint"
        );
        assert!(may_eject(&p, 1, 4) && !may_eject(&p, 2, 4));
    }
}
