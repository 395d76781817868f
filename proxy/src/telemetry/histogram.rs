//! The request latency histogram, written by every request on every core without a lock.
//!
//! prometheus-client's histograms take a mutex per observation (and the exemplar one a write
//! lock), so a busy route would serialise all cores on it. Here every bucket and the sum are
//! atomics, and a bucket's exemplar is swapped in whole (`ArcSwapOption`), so a
//! reader never sees half of one trace ID and half of another. prometheus-client cannot
//! encode exemplars it did not record itself (their fields are private to it), so this family
//! writes its own OpenMetrics lines; `tests/tests/metrics_format.rs` parses them with the
//! Python Prometheus client.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;

/// Upper bounds: 0.5 ms, doubling, to ~16 s; one more bucket holds the rest (`+Inf`).
const BOUNDS: usize = 16;

fn bound(i: usize) -> f64 {
    0.0005 * f64::from(1u32 << i)
}

/// The first bucket whose bound holds `elapsed`: bounds double from 0.5 ms, so it is the
/// bit length of how many half milliseconds (rounded up, less one) it took.
fn bucket(elapsed: Duration) -> usize {
    let halves = u64::try_from(elapsed.as_nanos())
        .unwrap_or(u64::MAX)
        .saturating_sub(1)
        / 500_000;
    ((u64::BITS - halves.leading_zeros()) as usize).min(BOUNDS)
}

/// The trace a sample came from, so that a slow bucket links to a trace in Jaeger.
struct Exemplar {
    trace_id: String,
    seconds: f64,
}

pub struct LatencyHistogram {
    /// Not cumulative: each sample counts in its own bucket, and the encoder sums them.
    buckets: [AtomicU64; BOUNDS + 1],
    sum_nanos: AtomicU64,
    exemplars: [ArcSwapOption<Exemplar>; BOUNDS + 1],
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
            exemplars: std::array::from_fn(|_| ArcSwapOption::empty()),
        }
    }
}

impl LatencyHistogram {
    pub fn observe(&self, elapsed: Duration, trace_id: Option<String>) {
        let seconds = elapsed.as_secs_f64();
        let i = bucket(elapsed);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add(
            u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        if let Some(trace_id) = trace_id {
            self.exemplars[i].store(Some(Arc::new(Exemplar { trace_id, seconds })));
        }
    }

    /// Appends this series' lines: `labels` is its label set, already encoded
    /// (`direction="inbound",route="r"`).
    pub fn encode(&self, out: &mut String, name: &str, labels: &str) {
        // The count is the buckets' total, read once, so that it always equals `+Inf`.
        let mut cumulative = 0;
        let mut lines = String::new();
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = if i == BOUNDS {
                "+Inf".to_string()
            } else {
                bound(i).to_string()
            };
            let _ = write!(lines, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
            if let Some(e) = self.exemplars[i].load().as_ref() {
                let _ = write!(lines, " # {{trace_id=\"{}\"}} {}", e.trace_id, e.seconds);
            }
            lines.push('\n');
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {cumulative}");
        out.push_str(&lines);
    }
}

/// A label value as OpenMetrics quotes it.
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_land_in_their_bucket_and_the_encoding_is_cumulative() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(400), None);
        h.observe(Duration::from_millis(3), Some("ab".repeat(16)));
        h.observe(Duration::from_secs(60), None);
        let mut out = String::new();
        h.encode(&mut out, "x", "route=\"r\"");
        assert!(out.contains("x_count{route=\"r\"} 3\n"), "{out}");
        assert!(
            out.contains("x_bucket{route=\"r\",le=\"0.0005\"} 1\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{route=\"r\",le=\"0.002\"} 1\n"),
            "{out}"
        );
        let exemplar = format!(
            "x_bucket{{route=\"r\",le=\"0.004\"}} 2 # {{trace_id=\"{}\"}} 0.003\n",
            "ab".repeat(16)
        );
        assert!(out.contains(&exemplar), "{out}");
        assert!(
            out.contains("x_bucket{route=\"r\",le=\"16.384\"} 2\n"),
            "{out}"
        );
        assert!(
            out.contains("x_bucket{route=\"r\",le=\"+Inf\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("x_sum{route=\"r\"} 60.0034\n"), "{out}");
    }

    #[test]
    fn a_sample_on_a_bound_is_counted_under_it() {
        for i in 0..BOUNDS {
            let on = Duration::from_secs_f64(bound(i));
            assert_eq!(bucket(on), i, "{on:?}");
            assert_eq!(bucket(on + Duration::from_nanos(1)), i + 1, "{on:?} + 1 ns");
        }
        assert_eq!(bucket(Duration::ZERO), 0);
        assert_eq!(bucket(Duration::from_secs(3600)), BOUNDS);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
