//! Medians over rounds (`--rounds N`), and the ratios the cost targets are stated in.
//!
//! The VM's speed moves by ±20 % from minute to minute, more than most changes under test.
//! Each round runs every target once, in an order that turns by one each round, so a ratio
//! taken within a round compares figures measured a minute apart at most; the median over
//! rounds then leaves out a round one target spent in a bad minute.

use serde_json::json;

use crate::Measured;

/// One row of the side-by-side table.
pub(crate) struct Row {
    pub round: usize,
    pub scenario: &'static str,
    pub target: &'static str,
    pub measured: Measured,
    pub idle_kib: Option<u64>,
    pub peak_kib: Option<u64>,
}

/// The order targets run in, in round `round` (from 0): the first (no proxy) always first,
/// the rest turned by one each round, so that none is always the one run after another.
pub(crate) fn order(targets: usize, round: usize) -> Vec<usize> {
    let rest = targets.saturating_sub(1).max(1);
    std::iter::once(0)
        .chain((0..targets.saturating_sub(1)).map(|k| 1 + (k + round) % rest))
        .take(targets)
        .collect()
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

fn range(values: &[f64]) -> (f64, f64) {
    values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        })
}

/// A ratio of two targets' figures in each round where both have it.
fn per_round(
    rows: &[Row],
    scenario: &str,
    (a, b): (&str, &str),
    figure: impl Fn(&Measured) -> Option<f64>,
) -> Vec<f64> {
    let find = |round: usize, target: &str| {
        rows.iter()
            .find(|r| r.round == round && r.scenario == scenario && r.target == target)
            .and_then(|r| figure(&r.measured))
    };
    let rounds = rows.iter().map(|r| r.round).max().map_or(0, |m| m + 1);
    (0..rounds)
        .filter_map(|round| Some(find(round, a)? / find(round, b)?.max(f64::MIN_POSITIVE)))
        .collect()
}

/// The medians table and the ratio lines, for the terminal, and the same as JSON.
pub(crate) fn summary(rows: &[Row], scenarios: &[&'static str]) -> (String, serde_json::Value) {
    let rounds = rows.iter().map(|r| r.round).max().map_or(0, |m| m + 1);
    let mut out = format!(
        "medians of {rounds} rounds\n{:<17} {:<20} {:>10} {:>9} {:>9} {:>11}\n",
        "scenario", "target", "req/s", "p50 ms", "p99 ms", "cpu µs/req"
    );
    let mut medians = Vec::new();
    let mut ratios = Vec::new();
    for &scenario in scenarios {
        let mut targets: Vec<&str> = Vec::new();
        for r in rows.iter().filter(|r| r.scenario == scenario) {
            if !targets.contains(&r.target) {
                targets.push(r.target);
            }
        }
        for &target in &targets {
            let of = |f: fn(&Measured) -> Option<f64>| {
                median(
                    rows.iter()
                        .filter(|r| r.scenario == scenario && r.target == target)
                        .filter_map(|r| f(&r.measured))
                        .collect(),
                )
            };
            let rps = of(|m| Some(m.rps));
            let p50 = of(|m| Some(m.p50_ms));
            let p99 = of(|m| Some(m.p99_ms));
            let cpu = of(|m| m.cpu_us_per_req);
            let fmt = |v: Option<f64>, places: usize| {
                v.map_or("-".to_string(), |v| format!("{v:.places$}"))
            };
            out.push_str(&format!(
                "{:<17} {:<20} {:>10} {:>9} {:>9} {:>11}\n",
                scenario,
                target,
                fmt(rps, 0),
                fmt(p50, 3),
                fmt(p99, 3),
                fmt(cpu, 1)
            ));
            medians.push(json!({
                "scenario": scenario, "target": target, "rps": rps, "p50_ms": p50,
                "p99_ms": p99, "cpu_us_per_request": cpu,
            }));
        }
        let mut line = |label: &str, pair: (&str, &str), f: fn(&Measured) -> Option<f64>| {
            let values = per_round(rows, scenario, pair, f);
            let Some(mid) = median(values.clone()) else {
                return;
            };
            let (lo, hi) = range(&values);
            out.push_str(&format!(
                "{scenario}: {label} {mid:.2}× (median; {lo:.2}–{hi:.2} over {} rounds)\n",
                values.len()
            ));
            ratios.push(json!({
                "scenario": scenario, "ratio": label, "median": mid, "min": lo, "max": hi,
                "per_round": values,
            }));
        };
        line(
            "outrigger/haproxy CPU per request",
            ("outrigger", "haproxy 2.6"),
            |m| m.cpu_us_per_req,
        );
        line("outrigger/haproxy p99", ("outrigger", "haproxy 2.6"), |m| {
            Some(m.p99_ms)
        });
        line("outrigger/envoy throughput", ("outrigger", "envoy"), |m| {
            Some(m.rps)
        });
        line(
            "outrigger/baseline CPU per request",
            ("outrigger", "outrigger (baseline)"),
            |m| m.cpu_us_per_req,
        );
        let lower = per_round(rows, scenario, ("outrigger", "haproxy 2.6"), |m| {
            Some(m.p99_ms)
        });
        if !lower.is_empty() {
            out.push_str(&format!(
                "{scenario}: outrigger's p99 lower than haproxy's in {} of {} rounds\n",
                lower.iter().filter(|r| **r < 1.0).count(),
                lower.len()
            ));
        }
    }
    (
        out,
        json!({ "rounds": rounds, "medians": medians, "ratios": ratios }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_order_turns_but_no_proxy_stays_first() {
        assert_eq!(order(5, 0), [0, 1, 2, 3, 4]);
        assert_eq!(order(5, 1), [0, 2, 3, 4, 1]);
        assert_eq!(order(5, 4), [0, 1, 2, 3, 4]);
        assert_eq!(order(1, 3), [0]);
        assert_eq!(order(2, 1), [0, 1]);
    }

    fn row(round: usize, target: &'static str, cpu: f64, p99: f64) -> Row {
        Row {
            round,
            scenario: "http1 max",
            target,
            measured: Measured {
                requests: 1000,
                failed: 0,
                rps: 1e6 / cpu,
                p50_ms: p99 / 2.0,
                p99_ms: p99,
                cpu_us_per_req: Some(cpu),
                steal_pct: 0.0,
            },
            idle_kib: None,
            peak_kib: None,
        }
    }

    #[test]
    fn ratios_are_taken_within_a_round_then_the_median_over_rounds() {
        // Round 2 ran in a slow minute for both: the within-round ratio is still 1.1.
        let rows = vec![
            row(0, "outrigger", 22.0, 2.0),
            row(0, "haproxy 2.6", 20.0, 2.2),
            row(1, "outrigger", 26.0, 2.6),
            row(1, "haproxy 2.6", 20.0, 2.4),
            row(2, "outrigger", 44.0, 4.0),
            row(2, "haproxy 2.6", 40.0, 4.4),
        ];
        let (text, doc) = summary(&rows, &["http1 max"]);
        let cpu = &doc["ratios"][0];
        assert_eq!(cpu["ratio"], "outrigger/haproxy CPU per request");
        assert!(
            (cpu["median"].as_f64().unwrap() - 1.1).abs() < 1e-9,
            "{text}"
        );
        assert!((cpu["max"].as_f64().unwrap() - 1.3).abs() < 1e-9, "{text}");
        assert!(
            text.contains("p99 lower than haproxy's in 2 of 3 rounds"),
            "{text}"
        );
        // The medians table: 26 µs is the middle of 22, 26 and 44.
        assert_eq!(doc["medians"][0]["cpu_us_per_request"], 26.0);
    }
}
