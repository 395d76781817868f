//! `outrigger-control-plane stat`: the golden signals of each service, or of each edge
//! (caller → callee), from the control plane's service graph, as a table or as JSON.

use std::time::Duration;

use serde::Deserialize;

use crate::admin_client::{AdminError, get_json};
use crate::service_graph::{EdgeStats, RouteStats, ServiceStats, Signals};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum What {
    /// Each service, with what all its callers saw.
    Services,
    /// Each caller → callee pair.
    Edges,
    /// Each route of each service, as its callers used it (requests, not tries).
    Routes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SortBy {
    Name,
    Rps,
    Success,
    P99,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Debug, Deserialize)]
pub struct Graph {
    pub interval_seconds: f64,
    pub window_seconds: f64,
    pub services: Vec<ServiceStats>,
    pub edges: Vec<EdgeStats>,
    #[serde(default)]
    pub routes: Vec<RouteStats>,
}

pub async fn fetch(admin: &str, window: Duration) -> Result<Graph, AdminError> {
    let path = format!("/graph?window={}ms", window.as_millis());
    let value = get_json(admin, &path).await?;
    serde_json::from_value(value).map_err(|e| AdminError::NotJson {
        addr: admin.to_string(),
        path,
        reason: e.to_string(),
    })
}

/// The rows, sorted, as the chosen output.
pub fn render(graph: &Graph, what: What, sort: Option<SortBy>, output: Output) -> String {
    match what {
        What::Services => {
            let mut rows = graph.services.clone();
            let sort = sort.unwrap_or(SortBy::Name);
            rows.sort_by(|a, b| compare(sort, (&a.service, &a.signals), (&b.service, &b.signals)));
            match output {
                Output::Json => json(&rows),
                Output::Table => table(
                    &["SERVICE", "SUCCESS", "RPS", "P50", "P95", "P99", "CALLERS"],
                    rows.iter().map(|r| {
                        let mut cells = vec![r.service.clone()];
                        cells.extend(signal_cells(&r.signals));
                        cells.push(r.callers.to_string());
                        cells
                    }),
                ),
            }
        }
        What::Routes => {
            let mut rows = graph.routes.clone();
            let sort = sort.unwrap_or(SortBy::Name);
            rows.sort_by(|a, b| {
                let (an, bn) = (
                    format!("{} {}", a.service, a.route),
                    format!("{} {}", b.service, b.route),
                );
                compare(sort, (&an, &a.signals), (&bn, &b.signals))
            });
            match output {
                Output::Json => json(&rows),
                Output::Table => table(
                    &[
                        "SERVICE", "ROUTE", "SUCCESS", "RPS", "P50", "P95", "P99", "CALLERS",
                    ],
                    rows.iter().map(|r| {
                        let mut cells = vec![r.service.clone(), r.route.clone()];
                        cells.extend(signal_cells(&r.signals));
                        cells.push(r.callers.to_string());
                        cells
                    }),
                ),
            }
        }
        What::Edges => {
            let mut rows = graph.edges.clone();
            let sort = sort.unwrap_or(SortBy::Rps);
            rows.sort_by(|a, b| {
                let (an, bn) = (
                    format!("{} {}", a.caller, a.callee),
                    format!("{} {}", b.caller, b.callee),
                );
                compare(sort, (&an, &a.signals), (&bn, &b.signals))
            });
            match output {
                Output::Json => json(&rows),
                Output::Table => table(
                    &[
                        "FROM", "TO", "SUCCESS", "RPS", "P50", "P95", "P99", "IDENTITY",
                    ],
                    rows.iter().map(|r| {
                        let mut cells = vec![r.caller.clone(), r.callee.clone()];
                        cells.extend(signal_cells(&r.signals));
                        cells.push(r.caller_identity.clone().unwrap_or_else(|| "-".into()));
                        cells
                    }),
                ),
            }
        }
    }
}

fn compare(sort: SortBy, a: (&String, &Signals), b: (&String, &Signals)) -> std::cmp::Ordering {
    let by_name = a.0.cmp(b.0);
    // Numbers sort largest first; worst success first.
    let desc = |x: Option<f64>, y: Option<f64>| y.unwrap_or(-1.0).total_cmp(&x.unwrap_or(-1.0));
    match sort {
        SortBy::Name => by_name,
        SortBy::Rps => desc(Some(a.1.rps), Some(b.1.rps)).then(by_name),
        SortBy::Success => {
            let worst = |s: Option<f64>| s.unwrap_or(2.0);
            worst(a.1.success_rate)
                .total_cmp(&worst(b.1.success_rate))
                .then(by_name)
        }
        SortBy::P99 => desc(a.1.p99_ms, b.1.p99_ms).then(by_name),
    }
}

fn signal_cells(s: &Signals) -> [String; 5] {
    let ms = |v: Option<f64>| match v {
        None => "-".to_string(),
        Some(v) if v < 10.0 => format!("{v:.2}ms"),
        Some(v) => format!("{v:.0}ms"),
    };
    [
        s.success_rate
            .map_or("-".into(), |r| format!("{:.2}%", r * 100.0)),
        format!("{:.1}", s.rps),
        ms(s.p50_ms),
        ms(s.p95_ms),
        ms(s.p99_ms),
    ]
}

fn json<T: serde::Serialize>(rows: &[T]) -> String {
    serde_json::to_string_pretty(rows).unwrap_or_default() + "\n"
}

/// Columns padded to their widest cell, two spaces apart.
pub fn table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = std::iter::once(header.iter().map(|h| h.to_string()).collect())
        .chain(rows)
        .collect();
    let mut widths = vec![0; header.len()];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    if rows.len() == 1 {
        out.push_str("(no traffic in the window)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signals(rps: f64, success: f64, p99: f64) -> Signals {
        Signals {
            rps,
            success_rate: Some(success),
            requests: (rps * 10.0) as u64,
            errors: 0,
            p50_ms: Some(1.0),
            p95_ms: Some(2.0),
            p99_ms: Some(p99),
            seconds: 10.0,
        }
    }

    fn graph() -> Graph {
        Graph {
            interval_seconds: 1.0,
            window_seconds: 10.0,
            services: vec![
                ServiceStats {
                    service: "db.default".into(),
                    signals: signals(20.0, 0.9, 30.0),
                    callers: 2,
                },
                ServiceStats {
                    service: "api.default".into(),
                    signals: signals(50.0, 1.0, 12.5),
                    callers: 1,
                },
            ],
            edges: vec![],
            routes: vec![],
        }
    }

    #[test]
    fn a_table_has_a_row_per_service_in_the_order_asked() {
        let by_name = render(&graph(), What::Services, None, Output::Table);
        let lines: Vec<&str> = by_name.lines().collect();
        assert!(lines[0].starts_with("SERVICE"));
        assert!(lines[1].starts_with("api.default"), "{by_name}");
        assert!(lines[2].contains("90.00%") && lines[2].contains("30ms"));
        let worst_first = render(
            &graph(),
            What::Services,
            Some(SortBy::Success),
            Output::Table,
        );
        assert!(
            worst_first
                .lines()
                .nth(1)
                .unwrap()
                .starts_with("db.default")
        );
        let empty = render(&graph(), What::Edges, None, Output::Table);
        assert!(empty.contains("no traffic"));
    }

    #[test]
    fn json_output_is_the_rows_themselves() {
        let out = render(&graph(), What::Services, Some(SortBy::Rps), Output::Json);
        let rows: Vec<ServiceStats> = serde_json::from_str(&out).unwrap();
        assert_eq!(rows[0].service, "api.default");
        assert_eq!(rows[1].signals.success_rate, Some(0.9));
    }
}
