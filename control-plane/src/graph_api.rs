//! `GET /graph` on the admin port: the service graph's golden signals over a window, as JSON
//! for `stat` and the dashboard.
//!
//! ```text
//! /graph?window=1m   → {"interval_seconds", "window_seconds", "services": [...], "edges": [...],
//!                       "routes": [...],
//!                       "history": {service: [{ago, rps, success_rate, p99_ms}, ...]}}
//! ```

use std::time::Duration;

use serde_json::json;

use crate::service_graph::ServiceGraph;

/// The window when none is asked for, as `linkerd viz stat` has it.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(60);

/// The window a query asks for: `window=<duration>`, at most the history.
pub fn window(query: Option<&str>, graph: &ServiceGraph) -> Result<Duration, String> {
    let limits = graph.limits();
    let most = limits.interval * (limits.history as u32 - 1);
    let asked = outrigger_core::query::param(query, "window");
    let window = match asked.as_deref() {
        None => DEFAULT_WINDOW,
        Some(text) => outrigger_core::duration::parse_duration(text)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("window: `{text}` is not a duration like 30s or 5m\n"))?,
    };
    Ok(window.min(most))
}

pub fn graph_json(graph: &ServiceGraph, query: Option<&str>) -> Result<String, String> {
    let window = window(query, graph)?;
    let limits = graph.limits();
    let body = json!({
        "interval_seconds": limits.interval.as_secs_f64(),
        "window_seconds": window.as_secs_f64(),
        "history_seconds": limits.interval.as_secs_f64() * limits.history as f64,
        "services": graph.services(window),
        "edges": graph.edges(window),
        "routes": graph.routes(window),
        "history": graph.service_history(),
    });
    Ok(serde_json::to_string_pretty(&body).unwrap_or_default() + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service_graph::Limits;

    #[test]
    fn the_window_is_read_from_the_query_and_held_to_the_history() {
        let g = ServiceGraph::new(Limits {
            interval: Duration::from_secs(5),
            history: 60,
            max_edges: 10,
        });
        assert_eq!(window(None, &g), Ok(DEFAULT_WINDOW));
        assert_eq!(window(Some("window=30s"), &g), Ok(Duration::from_secs(30)));
        assert_eq!(
            window(Some("x=1&window=2h"), &g),
            Ok(Duration::from_secs(295))
        );
        assert!(window(Some("window=soon"), &g).is_err());
        assert!(window(Some("window=0s"), &g).is_err());
    }
}
