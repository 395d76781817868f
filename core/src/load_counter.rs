//! What an endpoint (or a route) has been sent since the last load report: requests issued,
//! succeeded and failed, and their latencies in the shared sketch's buckets. Atomics only: a
//! request adds to three counters, and the reporter takes and zeroes them once per interval.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::latency_sketch::{self, BUCKETS, Sketch};

#[derive(Default)]
pub struct EndpointLoad {
    issued: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    /// Allocated at the first answer: an endpoint never sent to costs three counters.
    latency: OnceLock<Box<[AtomicU64; BUCKETS]>>,
}

/// One endpoint's load over an interval, as taken by the reporter.
#[derive(Debug, Default, PartialEq)]
pub struct LoadTaken {
    pub issued: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub latency: Sketch,
    /// The sum of the latencies in each bucket, in seconds, by bucket.
    pub latency_seconds: Vec<(usize, f64)>,
}

impl EndpointLoad {
    pub fn issued(&self) {
        self.issued.fetch_add(1, Ordering::Relaxed);
    }

    /// A try's outcome: an answer below 500 is a success; a 5xx, or no answer (refused,
    /// reset, timed out), is an error, as Envoy's load reports count them.
    pub fn finished(&self, success: bool, latency: Duration) {
        let counter = if success {
            &self.succeeded
        } else {
            &self.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let buckets = self
            .latency
            .get_or_init(|| Box::new(std::array::from_fn(|_| AtomicU64::new(0))));
        buckets[latency_sketch::bucket(latency)].fetch_add(1, Ordering::Relaxed);
    }

    /// Takes what was counted since the last call, leaving zeros.
    pub fn take(&self) -> LoadTaken {
        let mut taken = LoadTaken {
            issued: self.issued.swap(0, Ordering::Relaxed),
            succeeded: self.succeeded.swap(0, Ordering::Relaxed),
            failed: self.failed.swap(0, Ordering::Relaxed),
            ..Default::default()
        };
        if let Some(buckets) = self.latency.get() {
            for (index, count) in buckets.iter().enumerate() {
                let n = count.swap(0, Ordering::Relaxed);
                if n > 0 {
                    taken.latency.add(index, n);
                    // The bucket's midpoint stands for each request in it: the sum is for a
                    // mean, and the buckets are narrow.
                    let mid = latency_sketch::upper_bound(index).as_secs_f64() * 0.9;
                    taken.latency_seconds.push((index, mid * n as f64));
                }
            }
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_returns_the_interval_and_starts_the_next_at_zero() {
        let load = EndpointLoad::default();
        for _ in 0..3 {
            load.issued();
        }
        load.finished(true, Duration::from_millis(2));
        load.finished(true, Duration::from_millis(2));
        load.finished(false, Duration::from_secs(1));
        let taken = load.take();
        assert_eq!((taken.issued, taken.succeeded, taken.failed), (3, 2, 1));
        assert_eq!(taken.latency.total(), 3);
        let p50 = taken.latency.quantile(0.5).unwrap();
        assert!(p50 > Duration::from_micros(1500) && p50 < Duration::from_micros(2500));
        assert_eq!(load.take(), LoadTaken::default());
    }
}
