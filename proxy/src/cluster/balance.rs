//! Choosing an endpoint: power-of-two-choices over peak-EWMA latency, or round robin.
//!
//! Peak-EWMA (as in Finagle and Linkerd) tracks a latency estimate that jumps up at once on a
//! slow response and decays slowly back down, multiplied by the requests still in flight. Two
//! endpoints are drawn at random and the cheaper one wins, which avoids the herd behaviour of
//! always choosing the single best endpoint. All state is atomics: no lock on the hot path.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::policy::circuit_breaker::CircuitBreaker;
use crate::policy::outlier::{self, Health, OutlierPolicy, OutlierState};
use crate::policy::retry_budget::RetryBudget;
use crate::upstream::client::H2Connection;
use crate::upstream::http1_pool::Http1Pool;
use outrigger_core::load_counter::EndpointLoad;

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    Http2,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    #[default]
    PeakEwma,
    RoundRobin,
}

pub struct WeightedBackend {
    pub cluster: Arc<Cluster>,
    pub weight: u32,
}

/// How fast the latency estimate forgets a slow response.
const DECAY: Duration = Duration::from_secs(10);
/// The estimate for an endpoint that has not answered yet: optimistic, so new endpoints get
/// traffic, but not zero, so that in-flight requests still count against it.
const DEFAULT_RTT_NANOS: f64 = 1_000_000.0;

pub struct Cluster {
    pub name: String,
    pub protocol: UpstreamProtocol,
    pub lb: LbPolicy,
    pub connect_timeout: Duration,
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Shared by the cluster's requests; carried over a reload of an unchanged budget.
    pub retry_budget: Arc<RetryBudget>,
    pub breaker: Arc<CircuitBreaker>,
    /// `None`: outlier detection is off for this cluster.
    pub outlier: Option<OutlierPolicy>,
    /// `Some`: mTLS to the endpoints, which must prove one of these identities.
    pub tls: Option<ClusterTls>,
    /// Connections to it are opaque TCP: no protocol detection.
    pub opaque: bool,
    next: AtomicUsize,
    /// When the cluster last looked for a due probe (`now_nanos`): at most every 50 ms.
    probe_scan: AtomicU64,
}

const PROBE_SCAN: Duration = Duration::from_millis(50);

pub struct ClusterTls {
    /// HTTP/2 over mTLS.
    pub config: Arc<rustls::ClientConfig>,
    /// Opaque TCP over mTLS.
    pub tcp_config: Arc<rustls::ClientConfig>,
    pub identities: Vec<outrigger_core::spiffe::SpiffeId>,
}

impl Cluster {
    pub fn new(
        name: String,
        protocol: UpstreamProtocol,
        lb: LbPolicy,
        connect_timeout: Duration,
        endpoints: Vec<Arc<Endpoint>>,
    ) -> Self {
        Cluster {
            name,
            protocol,
            lb,
            connect_timeout,
            endpoints,
            retry_budget: Arc::new(RetryBudget::default()),
            breaker: Arc::new(CircuitBreaker::default()),
            outlier: None,
            tls: None,
            opaque: false,
            next: AtomicUsize::new(0),
            probe_scan: AtomicU64::new(0),
        }
    }

    /// Picks an endpoint other than `avoid` when the cluster has another: a retry should
    /// not go back to the endpoint that just failed.
    pub fn pick_avoiding(&self, avoid: Option<SocketAddr>) -> Option<&Arc<Endpoint>> {
        // A first attempt may be a probe; a retry goes where it is likeliest to succeed.
        let first = if avoid.is_none() {
            self.pick()?
        } else {
            self.pick_healthy()?
        };
        if avoid != Some(first.addr) || self.endpoints.len() < 2 {
            return Some(first);
        }
        match self.lb {
            LbPolicy::RoundRobin => self.pick_healthy(),
            // Power of two choices may draw the same one again; take the best of the rest.
            LbPolicy::PeakEwma => self
                .endpoints
                .iter()
                .filter(|e| Some(e.addr) != avoid && !e.outlier.is_ejected())
                .min_by(|a, b| a.cost().total_cmp(&b.cost())),
        }
    }

    /// An endpoint that is not ejected. If draws keep landing on ejected ones, scan; if every
    /// endpoint is ejected, use any (as Envoy's panic mode does): sending somewhere beats
    /// failing for certain.
    pub fn pick(&self) -> Option<&Arc<Endpoint>> {
        self.due_probe().or_else(|| self.pick_healthy())
    }

    /// An ejected endpoint whose probe is due, which this request then is (see `policy/outlier.rs`).
    fn due_probe(&self) -> Option<&Arc<Endpoint>> {
        self.outlier.as_ref()?;
        let (now, last) = (now_nanos(), self.probe_scan.load(Ordering::Relaxed));
        let due = last == 0 || now.saturating_sub(last) >= PROBE_SCAN.as_nanos() as u64;
        if !due
            || self
                .probe_scan
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return None;
        }
        self.endpoints.iter().find(|e| e.outlier.try_probe())
    }

    fn pick_healthy(&self) -> Option<&Arc<Endpoint>> {
        let first = self.pick_any()?;
        if self.outlier.is_none() || !first.outlier.is_ejected() {
            return Some(first);
        }
        for _ in 0..self.endpoints.len() {
            let e = self.pick_any()?;
            if !e.outlier.is_ejected() {
                return Some(e);
            }
        }
        self.endpoints
            .iter()
            .find(|e| !e.outlier.is_ejected())
            .or(Some(first))
    }

    /// Records an attempt's result against the endpoint; true if it was ejected now.
    pub fn observe(&self, endpoint: &Endpoint, health: Health) -> bool {
        let Some(policy) = &self.outlier else {
            return false;
        };
        let ejected = self
            .endpoints
            .iter()
            .filter(|e| e.outlier.is_ejected())
            .count();
        endpoint.outlier.observe(
            policy,
            health,
            outlier::may_eject(policy, ejected, self.endpoints.len()),
        )
    }

    fn pick_any(&self) -> Option<&Arc<Endpoint>> {
        let n = self.endpoints.len();
        match n {
            0 => None,
            1 => self.endpoints.first(),
            _ => match self.lb {
                LbPolicy::RoundRobin => {
                    let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
                    Some(&self.endpoints[i])
                }
                LbPolicy::PeakEwma => {
                    let a = fastrand::usize(..n);
                    let mut b = fastrand::usize(..n - 1);
                    if b >= a {
                        b += 1;
                    }
                    let (ea, eb) = (&self.endpoints[a], &self.endpoints[b]);
                    // An endpoint ramping up after an ejection looks dearer until it has.
                    let cost = |e: &Endpoint| e.cost() / e.outlier.slow_start_weight();
                    Some(if cost(ea) <= cost(eb) { ea } else { eb })
                }
            },
        }
    }
}

/// Picks one backend of a traffic split, in proportion to its weight.
pub fn pick_backend(backends: &[WeightedBackend], total_weight: u32) -> &WeightedBackend {
    if backends.len() == 1 {
        return &backends[0];
    }
    let mut ticket = fastrand::u32(..total_weight);
    for b in backends {
        if ticket < b.weight {
            return b;
        }
        ticket -= b.weight;
    }
    &backends[backends.len() - 1]
}

pub struct Endpoint {
    pub addr: SocketAddr,
    /// Used only when the endpoint's cluster speaks HTTP/1.1; shared with the response
    /// bodies that will give their connections back to it.
    pub h1: Arc<Http1Pool>,
    /// Used only when the endpoint's cluster speaks HTTP/2.
    pub h2: H2Connection,
    /// Consecutive failures and ejection; kept across reloads with the endpoint.
    pub outlier: OutlierState,
    /// What it was sent since the last load report; kept across reloads with the endpoint.
    pub load: EndpointLoad,
    outstanding: AtomicU64,
    /// f64 bits of the latency estimate, in nanoseconds.
    ewma: AtomicU64,
    /// Nanoseconds since `epoch()` of the last update.
    stamp: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_nanos() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Self {
        Endpoint {
            addr,
            h1: Arc::default(),
            h2: H2Connection::default(),
            outlier: OutlierState::default(),
            load: EndpointLoad::default(),
            outstanding: AtomicU64::new(0),
            ewma: AtomicU64::new(0f64.to_bits()),
            stamp: AtomicU64::new(now_nanos()),
        }
    }

    fn cost(&self) -> f64 {
        let ewma = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        let rtt = if ewma > 0.0 { ewma } else { DEFAULT_RTT_NANOS };
        rtt * (self.outstanding.load(Ordering::Relaxed) + 1) as f64
    }

    pub fn outstanding(&self) -> u64 {
        self.outstanding.load(Ordering::Relaxed)
    }

    pub fn latency_estimate(&self) -> Duration {
        Duration::from_nanos(f64::from_bits(self.ewma.load(Ordering::Relaxed)) as u64)
    }

    /// `now` is `now_nanos()` at the sample, read once by the caller.
    fn observe(&self, rtt: Duration, now: u64) {
        let rtt = rtt.as_nanos() as f64;
        let elapsed = now.saturating_sub(self.stamp.swap(now, Ordering::Relaxed)) as f64;
        let old = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        // Racing updates may lose one sample; the estimate is a heuristic, not an account.
        let new = if rtt > old {
            rtt
        } else {
            let w = (-elapsed / DECAY.as_nanos() as f64).exp();
            old * w + rtt * (1.0 - w)
        };
        self.ewma.store(new.to_bits(), Ordering::Relaxed);
    }

    /// Counts a request as in flight until the guard is dropped.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.outstanding.fetch_add(1, Ordering::Relaxed);
        self.load.issued();
        InFlight {
            endpoint: self.clone(),
            started: now_nanos(),
            counted: std::cell::Cell::new(false),
        }
    }
}

/// What an overloaded answer weighs when it names no wait.
const OVERLOAD_PENALTY: Duration = Duration::from_secs(1);
/// And at most, whatever it names: the estimate must come back within a few decays.
const MAX_OVERLOAD_PENALTY: Duration = Duration::from_secs(10);

pub struct InFlight {
    endpoint: Arc<Endpoint>,
    /// `now_nanos()` when it started.
    started: u64,
    /// Its outcome is in the endpoint's load report.
    counted: std::cell::Cell<bool>,
}

/// The moment a try's answer came, read once for the load report and the latency estimate:
/// a clock read costs more than the arithmetic around it.
#[derive(Clone, Copy)]
pub struct Answered {
    at: u64,
    took: Duration,
}

impl InFlight {
    /// Reads the clock for what the try's end records.
    pub fn answered(&self) -> Answered {
        let at = now_nanos();
        Answered {
            at,
            took: Duration::from_nanos(at.saturating_sub(self.started)),
        }
    }

    /// Counts the try in the endpoint's load report: success or error, and its latency.
    pub fn finished(&self, success: bool, at: Answered) {
        self.counted.set(true);
        self.endpoint.load.finished(success, at.took);
    }

    /// Records the time to the response head as a latency sample.
    pub fn responded(&self, at: Answered) {
        self.endpoint.observe(at.took, at.at);
    }

    /// The endpoint answered that it is overloaded (429, or a `Retry-After`): load, not
    /// failure. It is not ejected, but its latency estimate takes the wait it asked for (a
    /// second if it named none), so power-of-two-choices steers away until that decays.
    pub fn overloaded(&self, retry_after: Option<Duration>, at: Answered) {
        let asked = retry_after
            .unwrap_or(OVERLOAD_PENALTY)
            .min(MAX_OVERLOAD_PENALTY);
        self.endpoint.observe(at.took.max(asked), at.at);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Given up before an answer (the request's timeout, or its caller left): an error in
        // the load report, as a reset upstream request is in Envoy's.
        if !self.counted.get() {
            self.endpoint.load.finished(false, self.answered().took);
        }
        self.endpoint.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(n: usize, lb: LbPolicy) -> Cluster {
        let eps = (0..n)
            .map(|i| {
                Arc::new(Endpoint::new(SocketAddr::from((
                    [127, 0, 0, 1],
                    1000 + i as u16,
                ))))
            })
            .collect();
        Cluster::new(
            "c".into(),
            UpstreamProtocol::Http1,
            lb,
            Duration::from_secs(1),
            eps,
        )
    }

    #[test]
    fn round_robin_cycles() {
        let c = cluster(3, LbPolicy::RoundRobin);
        let ports: Vec<u16> = (0..6).map(|_| c.pick().unwrap().addr.port()).collect();
        assert_eq!(ports, [1000, 1001, 1002, 1000, 1001, 1002]);
    }

    #[test]
    fn peak_ewma_avoids_the_slow_endpoint() {
        let c = cluster(2, LbPolicy::PeakEwma);
        c.endpoints[0].observe(Duration::from_millis(200), now_nanos());
        c.endpoints[1].observe(Duration::from_millis(2), now_nanos());
        let slow_picks = (0..100)
            .filter(|_| c.pick().unwrap().addr.port() == 1000)
            .count();
        assert_eq!(slow_picks, 0, "with two endpoints P2C always compares both");
    }

    #[test]
    fn an_endpoint_that_says_it_is_overloaded_is_steered_around() {
        let c = cluster(2, LbPolicy::PeakEwma);
        c.endpoints[1].observe(Duration::from_millis(2), now_nanos());
        c.endpoints[0].observe(Duration::from_millis(2), now_nanos());
        let try_ = c.endpoints[0].start();
        try_.overloaded(None, try_.answered());
        assert!((0..50).all(|_| c.pick().unwrap().addr.port() == 1001));
        assert!(!c.endpoints[0].outlier.is_ejected(), "load is not failure");
    }

    #[test]
    fn peak_ewma_counts_in_flight_requests() {
        let c = cluster(2, LbPolicy::PeakEwma);
        let _busy: Vec<_> = (0..5).map(|_| c.endpoints[0].start()).collect();
        assert!((0..50).all(|_| c.pick().unwrap().addr.port() == 1001));
    }
}
