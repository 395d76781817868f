//! The latency sketch a proxy's load reports carry and the control plane merges: counts in
//! fixed, log-spaced buckets.
//!
//! Why buckets rather than percentiles: a p99 cannot be averaged, so percentiles from many
//! proxies and many intervals could not be combined into an edge's p99 over a window. Counts in
//! shared buckets simply add. Four buckets per doubling (each 19 % wider than the last) put
//! any percentile within about ±10 % of the true value, from 50 µs to 44 s in 80 buckets and one for slower.
//!
//! On the wire (LRS, `envoy.service.load_stats.v3`) each non-empty bucket is one
//! `EndpointLoadMetricStats` named `outrigger.io/latency/<index>`: the requests in it, and
//! the sum of their latencies in seconds.

use std::time::Duration;

/// Buckets 0..80 end at `upper_bound`; the last one holds everything slower.
pub const BUCKETS: usize = 81;
/// The upper bound of bucket 0, in microseconds.
const FIRST_BOUND_MICROS: f64 = 50.0;
/// Buckets per doubling.
const PER_OCTAVE: f64 = 4.0;
/// A load report's `cluster_service_name` that makes the entry a route's (of the cluster's
/// service) rather than the cluster's own: `outrigger.io/route/<route name>`.
pub const ROUTE_PREFIX: &str = "outrigger.io/route/";
/// What a load-report metric name starts with when it is a latency bucket.
pub const METRIC_PREFIX: &str = "outrigger.io/latency/";

/// The bucket a latency falls in.
pub fn bucket(latency: Duration) -> usize {
    let micros = latency.as_secs_f64() * 1e6;
    if micros <= FIRST_BOUND_MICROS {
        return 0;
    }
    let index = ((micros / FIRST_BOUND_MICROS).log2() * PER_OCTAVE).ceil();
    (index as usize).min(BUCKETS - 1)
}

/// The slowest latency bucket `index` holds (the last bucket's is its lower bound's double).
pub fn upper_bound(index: usize) -> Duration {
    let index = index.min(BUCKETS) as f64;
    Duration::from_secs_f64(FIRST_BOUND_MICROS * 2f64.powf(index / PER_OCTAVE) / 1e6)
}

/// The load-report metric name of bucket `index`.
pub fn metric_name(index: usize) -> String {
    format!("{METRIC_PREFIX}{index}")
}

/// The bucket a load-report metric names, if it is one of ours and in range.
pub fn parse_metric_name(name: &str) -> Option<usize> {
    let index: usize = name.strip_prefix(METRIC_PREFIX)?.parse().ok()?;
    (index < BUCKETS).then_some(index)
}

/// Counts per bucket, kept sparse: most edges use a dozen buckets of the 81.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sketch {
    /// (bucket, count), sorted by bucket, no zero counts. A u32 count (saturating) keeps a
    /// bucket to 8 bytes: a slot of one edge over one interval never holds four billion.
    counts: Vec<(u8, u32)>,
}

impl Sketch {
    pub fn add(&mut self, index: usize, count: u64) {
        if count == 0 || index >= BUCKETS {
            return;
        }
        let index = index as u8;
        let count = u32::try_from(count).unwrap_or(u32::MAX);
        match self.counts.binary_search_by_key(&index, |(i, _)| *i) {
            Ok(at) => self.counts[at].1 = self.counts[at].1.saturating_add(count),
            Err(at) => self.counts.insert(at, (index, count)),
        }
    }

    pub fn merge(&mut self, other: &Sketch) {
        for &(index, count) in &other.counts {
            self.add(index as usize, u64::from(count));
        }
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().map(|(_, c)| u64::from(*c)).sum()
    }

    /// Non-empty buckets, fastest first.
    pub fn buckets(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.counts.iter().map(|&(i, c)| (i as usize, u64::from(c)))
    }

    /// The latency below which a fraction `q` of the requests fall, interpolated within its
    /// bucket on the log scale the buckets are spaced on; `None` with no requests.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total = self.total();
        if total == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * total as f64).max(1.0);
        let mut below = 0u64;
        for &(index, count) in &self.counts {
            let count = u64::from(count);
            if (below + count) as f64 >= rank {
                let index = index as usize;
                let high = upper_bound(index).as_secs_f64();
                let low = if index == 0 {
                    high / 2.0
                } else {
                    upper_bound(index - 1).as_secs_f64()
                };
                let within = (rank - below as f64) / count as f64;
                return Some(Duration::from_secs_f64(low * (high / low).powf(within)));
            }
            below += count;
        }
        self.counts
            .last()
            .map(|&(index, _)| upper_bound(index as usize))
    }

    /// What one more bucket costs to hold, for the control plane's stated memory bound.
    pub const BYTES_PER_BUCKET: usize = std::mem::size_of::<(u8, u32)>();

    pub fn heap_bytes(&self) -> usize {
        self.counts.capacity() * Self::BYTES_PER_BUCKET
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_latency_lands_in_the_bucket_whose_bounds_hold_it() {
        for micros in [1u64, 50, 51, 100, 999, 1_000, 12_345, 250_000, 7_000_000] {
            let d = Duration::from_micros(micros);
            let i = bucket(d);
            assert!(
                d <= upper_bound(i) + Duration::from_nanos(1),
                "{micros} µs in {i}"
            );
            if i > 0 {
                assert!(d > upper_bound(i - 1), "{micros} µs above bucket {i}");
            }
        }
        assert_eq!(bucket(Duration::from_secs(3600)), BUCKETS - 1);
        assert!(upper_bound(BUCKETS - 2) >= Duration::from_secs(40));
    }

    #[test]
    fn metric_names_round_trip_and_foreign_ones_are_not_ours() {
        for i in [0, 17, BUCKETS - 1] {
            assert_eq!(parse_metric_name(&metric_name(i)), Some(i));
        }
        assert_eq!(parse_metric_name(&metric_name(BUCKETS)), None);
        assert_eq!(parse_metric_name("outrigger.io/latency/-1"), None);
        assert_eq!(parse_metric_name("cpu_utilization"), None);
    }

    #[test]
    fn quantiles_are_within_a_bucket_of_the_truth() {
        let mut s = Sketch::default();
        // 1 ms … 100 ms, one request per 100 µs step.
        let latencies: Vec<Duration> = (10..=1000)
            .map(|i| Duration::from_micros(i * 100))
            .collect();
        for &d in &latencies {
            s.add(bucket(d), 1);
        }
        for q in [0.5, 0.95, 0.99] {
            let truth = latencies[((latencies.len() as f64) * q) as usize - 1].as_secs_f64();
            let estimate = s.quantile(q).unwrap().as_secs_f64();
            assert!(
                (estimate / truth - 1.0).abs() < 0.1,
                "p{q}: {estimate} against {truth}"
            );
        }
        assert_eq!(Sketch::default().quantile(0.5), None);
    }

    #[test]
    fn merging_adds_counts_bucket_by_bucket() {
        let (mut a, mut b) = (Sketch::default(), Sketch::default());
        a.add(3, 2);
        a.add(10, 1);
        b.add(10, 4);
        b.add(1, 1);
        b.add(5, 0);
        a.merge(&b);
        assert_eq!(a.buckets().collect::<Vec<_>>(), [(1, 1), (3, 2), (10, 5)]);
        assert_eq!(a.total(), 8);
    }
}
