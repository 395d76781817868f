//! The service graph: the proxies' load reports, folded into edges (caller service → callee
//! service) with a short history, from which `stat` and the dashboard read golden signals.
//!
//! Time is cut into slots one report interval wide. Every proxy reports once per interval, so
//! each complete slot holds exactly one report from each proxy on an edge, and a window's
//! rate is its complete slots' requests over their length, whatever the proxies' phases.
//! The slot now filling is left out until it is complete.
//!
//! Memory is bounded by the history (`Limits::history` slots per edge) and the number of
//! edges (`Limits::max_edges`); see `Limits::bytes_per_edge` for the figure.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use outrigger_core::latency_sketch::{BUCKETS, Sketch};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How often proxies report: the slot width.
    pub interval: Duration,
    /// Slots kept per edge.
    pub history: usize,
    /// Entries held at once, edges and routes together; a report for a new one beyond this is
    /// dropped and counted.
    pub max_edges: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            interval: DEFAULT_INTERVAL,
            history: 60,
            max_edges: 4096,
        }
    }
}

/// Proxies report every 5 s: a minute's window is 12 slots, and the history five minutes.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

impl Limits {
    /// The most one edge can hold: every slot with every latency bucket in use.
    pub fn bytes_per_edge(&self) -> usize {
        std::mem::size_of::<Edge>()
            + self.history * (std::mem::size_of::<Slot>() + BUCKETS * Sketch::BYTES_PER_BUCKET)
    }
}

/// What one report says about one edge over one interval.
#[derive(Debug, Clone, Default)]
pub struct EdgeReport {
    pub successes: u64,
    pub errors: u64,
    pub latency: Sketch,
}

#[derive(Default)]
struct Slot {
    index: u64,
    successes: u64,
    errors: u64,
    latency: Sketch,
}

struct Edge {
    /// The SPIFFE ID the caller's proxies proved, when they reported over mTLS.
    identity: Option<Arc<str>>,
    /// Ascending by index.
    slots: VecDeque<Slot>,
    first: u64,
}

/// An edge's (or a service's) golden signals over a window.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Signals {
    /// Requests answered per second.
    pub rps: f64,
    /// Of those, the fraction that succeeded; `None` with no requests.
    pub success_rate: Option<f64>,
    pub requests: u64,
    pub errors: u64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// The seconds the figures cover (less than the window for a young edge).
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EdgeStats {
    pub caller: String,
    pub callee: String,
    pub caller_identity: Option<String>,
    #[serde(flatten)]
    pub signals: Signals,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceStats {
    pub service: String,
    /// What its callers saw, all of them together.
    #[serde(flatten)]
    pub signals: Signals,
    pub callers: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouteStats {
    pub service: String,
    pub route: String,
    /// What its callers saw, all of them together: requests, not tries.
    #[serde(flatten)]
    pub signals: Signals,
    pub callers: usize,
}

/// One point of a chart: a slot's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Seconds before now at which the slot ended.
    pub ago: f64,
    pub rps: f64,
    pub success_rate: Option<f64>,
    pub p99_ms: Option<f64>,
}

pub struct ServiceGraph {
    limits: Limits,
    started: Instant,
    inner: Mutex<Inner>,
}

/// Caller, callee, and the route of the callee's, for a route's figures (`None`: the edge's).
type Key = (Arc<str>, Arc<str>, Option<Arc<str>>);

#[derive(Default)]
struct Inner {
    edges: HashMap<Key, Edge>,
    /// Reports for new edges dropped at `max_edges`.
    refused: u64,
}

impl ServiceGraph {
    pub fn new(limits: Limits) -> Self {
        let limits = Limits {
            interval: limits.interval.max(Duration::from_millis(100)),
            history: limits.history.max(2),
            max_edges: limits.max_edges,
        };
        ServiceGraph {
            limits,
            started: Instant::now(),
            inner: Mutex::default(),
        }
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn slot_now(&self) -> u64 {
        (self.started.elapsed().as_nanos() / self.limits.interval.as_nanos()) as u64
    }

    /// Adds a report to the edge (or, with `route`, to that route of the callee's as this
    /// caller used it); false if it is new and the graph is full.
    pub fn record(
        &self,
        (caller, callee, route): (&str, &str, Option<&str>),
        identity: Option<&str>,
        report: &EdgeReport,
    ) -> bool {
        let now = self.slot_now();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let key: Key = (caller.into(), callee.into(), route.map(Arc::from));
        if !inner.edges.contains_key(&key) {
            inner.prune(now, self.limits.history as u64);
            if inner.edges.len() >= self.limits.max_edges {
                inner.refused += 1;
                return false;
            }
        }
        let edge = inner.edges.entry(key).or_insert_with(|| Edge {
            identity: None,
            slots: VecDeque::new(),
            first: now,
        });
        if let Some(id) = identity
            && edge.identity.as_deref() != Some(id)
        {
            edge.identity = Some(id.into());
        }
        if edge.slots.back().is_none_or(|s| s.index != now) {
            edge.slots.push_back(Slot {
                index: now,
                ..Default::default()
            });
        }
        while edge.slots.len() > self.limits.history {
            edge.slots.pop_front();
        }
        let slot = edge.slots.back_mut().expect("pushed above");
        slot.successes = slot.successes.saturating_add(report.successes);
        slot.errors = slot.errors.saturating_add(report.errors);
        slot.latency.merge(&report.latency);
        true
    }

    /// Every edge with requests in the window, busiest first.
    pub fn edges(&self, window: Duration) -> Vec<EdgeStats> {
        let now = self.slot_now();
        let slots = self.window_slots(window);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.prune(now, self.limits.history as u64);
        let mut out: Vec<EdgeStats> = inner
            .edges
            .iter()
            .filter(|((_, _, route), _)| route.is_none())
            .filter_map(|((caller, callee, _), edge)| {
                let (acc, covered) = edge.window(now, slots);
                (acc.successes + acc.errors > 0).then(|| EdgeStats {
                    caller: caller.to_string(),
                    callee: callee.to_string(),
                    caller_identity: edge.identity.as_deref().map(str::to_string),
                    signals: acc.signals(covered as f64 * self.limits.interval.as_secs_f64()),
                })
            })
            .collect();
        out.sort_by(|a, b| {
            b.signals
                .rps
                .total_cmp(&a.signals.rps)
                .then_with(|| (&a.caller, &a.callee).cmp(&(&b.caller, &b.callee)))
        });
        out
    }

    /// Each service called in the window, with what all its callers saw.
    pub fn services(&self, window: Duration) -> Vec<ServiceStats> {
        let now = self.slot_now();
        let slots = self.window_slots(window);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.prune(now, self.limits.history as u64);
        let mut by_callee: HashMap<&str, (Slot, u64, usize)> = HashMap::new();
        for ((_, callee, _), edge) in inner.edges.iter().filter(|(k, _)| k.2.is_none()) {
            let (acc, covered) = edge.window(now, slots);
            if acc.successes + acc.errors == 0 {
                continue;
            }
            let entry = by_callee.entry(callee).or_default();
            entry.0.add(&acc);
            entry.1 = entry.1.max(covered);
            entry.2 += 1;
        }
        let mut out: Vec<ServiceStats> = by_callee
            .into_iter()
            .map(|(service, (acc, covered, callers))| ServiceStats {
                service: service.to_string(),
                signals: acc.signals(covered as f64 * self.limits.interval.as_secs_f64()),
                callers,
            })
            .collect();
        out.sort_by(|a, b| a.service.cmp(&b.service));
        out
    }

    /// Every service some caller reported calling within the history.
    pub fn callees(&self) -> std::collections::BTreeSet<String> {
        let now = self.slot_now();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.prune(now, self.limits.history as u64);
        inner
            .edges
            .keys()
            .map(|(_, callee, _)| callee.to_string())
            .collect()
    }

    /// Each route that callers used in the window, with what all of them saw.
    pub fn routes(&self, window: Duration) -> Vec<RouteStats> {
        let now = self.slot_now();
        let slots = self.window_slots(window);
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.prune(now, self.limits.history as u64);
        let mut by_route: BTreeMap<(&str, &str), (Slot, u64, usize)> = BTreeMap::new();
        for ((_, callee, route), edge) in &inner.edges {
            let Some(route) = route else { continue };
            let (acc, covered) = edge.window(now, slots);
            if acc.successes + acc.errors == 0 {
                continue;
            }
            let entry = by_route.entry((callee, route)).or_default();
            entry.0.add(&acc);
            entry.1 = entry.1.max(covered);
            entry.2 += 1;
        }
        by_route
            .into_iter()
            .map(|((service, route), (acc, covered, callers))| RouteStats {
                service: service.to_string(),
                route: route.to_string(),
                signals: acc.signals(covered as f64 * self.limits.interval.as_secs_f64()),
                callers,
            })
            .collect()
    }

    /// Each called service's complete slots, oldest first, with all its callers together:
    /// the dashboard's charts.
    pub fn service_history(&self) -> BTreeMap<String, Vec<Point>> {
        let now = self.slot_now();
        let width = self.limits.interval.as_secs_f64();
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut slots: BTreeMap<&str, BTreeMap<u64, Slot>> = BTreeMap::new();
        for ((_, callee, _), edge) in inner.edges.iter().filter(|(k, _)| k.2.is_none()) {
            let service = slots.entry(callee).or_default();
            for s in edge.slots.iter().filter(|s| s.index < now) {
                service.entry(s.index).or_default().add(s);
            }
        }
        slots
            .into_iter()
            .map(|(service, by_index)| {
                let points = by_index
                    .into_iter()
                    .map(|(index, s)| {
                        let signals = s.signals(width);
                        Point {
                            ago: (now - index - 1) as f64 * width,
                            rps: signals.rps,
                            success_rate: signals.success_rate,
                            p99_ms: signals.p99_ms,
                        }
                    })
                    .collect();
                (service.to_string(), points)
            })
            .collect()
    }

    /// Entries held (edges and routes), reports refused for want of room, and the bytes the
    /// graph holds.
    pub fn usage(&self) -> (usize, u64, usize) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = inner
            .edges
            .values()
            .map(|e| {
                std::mem::size_of::<Edge>()
                    + e.slots.capacity() * std::mem::size_of::<Slot>()
                    + e.slots
                        .iter()
                        .map(|s| s.latency.heap_bytes())
                        .sum::<usize>()
            })
            .sum();
        (inner.edges.len(), inner.refused, bytes)
    }

    /// Edges held (routes left out).
    pub fn edge_count(&self) -> usize {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.edges.keys().filter(|k| k.2.is_none()).count()
    }

    fn window_slots(&self, window: Duration) -> u64 {
        let n = window.as_nanos().div_ceil(self.limits.interval.as_nanos()) as u64;
        n.clamp(1, self.limits.history as u64 - 1)
    }
}

impl Inner {
    /// Forgets slots older than the history, and edges left with none.
    fn prune(&mut self, now: u64, history: u64) {
        let oldest = now.saturating_sub(history);
        self.edges.retain(|_, edge| {
            while edge.slots.front().is_some_and(|s| s.index < oldest) {
                edge.slots.pop_front();
            }
            !edge.slots.is_empty()
        });
    }
}

impl Edge {
    /// The sum of the complete slots in the window, and how many slots that covers.
    fn window(&self, now: u64, slots: u64) -> (Slot, u64) {
        let from = now.saturating_sub(slots).max(self.first);
        let mut acc = Slot::default();
        for s in self
            .slots
            .iter()
            .filter(|s| s.index >= from && s.index < now)
        {
            acc.add(s);
        }
        (acc, now - from.min(now))
    }
}

impl Slot {
    fn add(&mut self, other: &Slot) {
        self.successes += other.successes;
        self.errors += other.errors;
        self.latency.merge(&other.latency);
    }

    fn signals(&self, seconds: f64) -> Signals {
        let requests = self.successes + self.errors;
        let ms = |q| self.latency.quantile(q).map(|d| d.as_secs_f64() * 1e3);
        Signals {
            rps: if seconds > 0.0 {
                requests as f64 / seconds
            } else {
                0.0
            },
            success_rate: (requests > 0).then(|| self.successes as f64 / requests as f64),
            requests,
            errors: self.errors,
            p50_ms: ms(0.5),
            p95_ms: ms(0.95),
            p99_ms: ms(0.99),
            seconds,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(successes: u64, errors: u64, bucket: usize) -> EdgeReport {
        let mut latency = Sketch::default();
        latency.add(bucket, successes + errors);
        EdgeReport {
            successes,
            errors,
            latency,
        }
    }

    const SECOND: Duration = Duration::from_secs(1);

    fn graph() -> ServiceGraph {
        ServiceGraph::new(Limits {
            interval: SECOND,
            history: 10,
            max_edges: 2,
        })
    }

    /// Two proxies of one caller report each second at different phases: the rate is
    /// exact, and the slot still filling is not counted.
    #[tokio::test(start_paused = true)]
    async fn the_rate_is_each_complete_slots_requests_over_their_length() {
        let g = graph();
        tokio::time::advance(Duration::from_millis(100)).await;
        for _ in 0..5 {
            g.record(("web", "api", None), None, &report(9, 1, 20));
            tokio::time::advance(Duration::from_millis(500)).await;
            g.record(("web", "api", None), None, &report(18, 2, 20));
            tokio::time::advance(Duration::from_millis(500)).await;
        }
        let edges = g.edges(Duration::from_secs(3));
        assert_eq!(edges.len(), 1);
        let s = &edges[0].signals;
        assert_eq!(s.rps, 30.0);
        assert_eq!(s.success_rate, Some(0.9));
        assert_eq!(s.seconds, 3.0);
        assert!(s.p50_ms.is_some());
        // A young edge is averaged over the slots it has, not the whole window.
        assert_eq!(g.edges(Duration::from_secs(60))[0].signals.rps, 30.0);
    }

    #[tokio::test(start_paused = true)]
    async fn services_merge_their_callers_and_old_slots_are_forgotten() {
        let g = graph();
        g.record(
            ("web", "api", None),
            Some("spiffe://t/ns/a/sa/web"),
            &report(10, 0, 10),
        );
        g.record(("cron", "api", None), None, &report(5, 5, 30));
        tokio::time::advance(SECOND).await;
        let services = g.services(SECOND);
        assert_eq!(services.len(), 1);
        assert_eq!(services[0].callers, 2);
        assert_eq!(services[0].signals.requests, 20);
        assert_eq!(services[0].signals.success_rate, Some(0.75));
        let web = g
            .edges(SECOND)
            .into_iter()
            .find(|e| e.caller == "web")
            .unwrap();
        assert_eq!(
            web.caller_identity.as_deref(),
            Some("spiffe://t/ns/a/sa/web")
        );
        // Past the history, the edges are gone, and their room is free again.
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(g.edges(Duration::from_secs(5)).is_empty());
        assert_eq!(g.usage().0, 0);
    }

    /// The figure the docs state: at most 42 KB per edge (every latency bucket used in every
    /// slot), so at most 4,096 × 42 KB for the whole graph.
    #[test]
    fn an_edge_holds_at_most_42_kb() {
        let per_edge = Limits::default().bytes_per_edge();
        assert!(per_edge <= 42 * 1024, "{per_edge} bytes");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_graph_refuses_new_edges_and_counts_them() {
        let g = graph();
        assert!(g.record(("a", "b", None), None, &report(1, 0, 1)));
        assert!(g.record(("a", "c", None), None, &report(1, 0, 1)));
        assert!(!g.record(("a", "d", None), None, &report(1, 0, 1)));
        // An edge it holds still takes reports.
        assert!(g.record(("a", "b", None), None, &report(1, 0, 1)));
        let (edges, refused, bytes) = g.usage();
        assert_eq!((edges, refused), (2, 1));
        assert!(bytes <= 2 * g.limits().bytes_per_edge());
    }
}
