//! The series a route writes on every request, found once when a config holding the route
//! is accepted and kept on the route, so that a request updates its metrics without a label
//! lookup, an allocation or a lock.
//!
//! - Requests by status: each (status, gRPC status, caller) seen so far maps to its counter
//!   in the `requests` family, in a map the route swaps whole (`ArcSwap`). A request reads it
//!   without a lock; only a combination never seen before copies it once, and takes the
//!   family's lock then.
//! - Latency: a lock-free `LatencyHistogram`, allocated by the route's first request. A route
//!   nobody called costs a few words and writes no lines at scrape.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::telemetry::histogram::{LatencyHistogram, escape};
use crate::telemetry::labels::{RequestLabels, empty, grpc_status_label};

pub struct RouteSeries {
    direction: &'static str,
    route: Arc<str>,
    requests: ArcSwapOption<StatusCounters>,
    duration: OnceLock<Box<LatencyHistogram>>,
    /// What the route was sent since the last load report.
    pub load: outrigger_core::load_counter::EndpointLoad,
}

/// foldhash rather than SipHash: the keys are a status, a gRPC code and a verified identity,
/// which no caller can choose freely, and this lookup runs on every request.
type StatusCounters = HashMap<StatusKey, Counter, foldhash::fast::RandomState>;

#[derive(Clone, Eq)]
struct StatusKey {
    status: u16,
    grpc_status: &'static str,
    peer: Arc<str>,
}

// By content, as equality is: equal keys hash alike.
impl std::hash::Hash for StatusKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.status.hash(state);
        self.grpc_status.hash(state);
        self.peer.hash(state);
    }
}

impl PartialEq for StatusKey {
    fn eq(&self, other: &Self) -> bool {
        // The gRPC label is one of a fixed set of statics, and a connection's requests share
        // one identity string: the pointers usually decide, without comparing text.
        self.status == other.status
            && (std::ptr::eq(self.grpc_status, other.grpc_status)
                || self.grpc_status == other.grpc_status)
            && (Arc::ptr_eq(&self.peer, &other.peer) || self.peer == other.peer)
    }
}

/// One finished request, as its route's series see it.
pub struct Outcome<'a> {
    pub status: u16,
    pub grpc_status: Option<&'a str>,
    pub peer: Option<Arc<str>>,
    pub elapsed: Duration,
    pub trace_id: Option<String>,
}

impl RouteSeries {
    fn new(direction: &'static str, route: Arc<str>) -> Self {
        RouteSeries {
            direction,
            route,
            requests: ArcSwapOption::empty(),
            duration: OnceLock::new(),
            load: Default::default(),
        }
    }

    pub(super) fn record(&self, requests: &Family<RequestLabels, Counter>, o: Outcome<'_>) {
        let key = StatusKey {
            status: o.status,
            grpc_status: grpc_status_label(o.grpc_status),
            peer: o.peer.unwrap_or_else(empty),
        };
        let counted = self
            .requests
            .load()
            .as_ref()
            .and_then(|map| map.get(&key).map(Counter::inc))
            .is_some();
        if !counted {
            self.first_of(requests, key).inc();
        }
        self.duration
            .get_or_init(Box::default)
            .observe(o.elapsed, o.trace_id);
    }

    /// A combination this route has not counted before: its counter joins the map.
    fn first_of(&self, requests: &Family<RequestLabels, Counter>, key: StatusKey) -> Counter {
        let counter = requests
            .get_or_create(&RequestLabels {
                direction: self.direction,
                route: self.route.clone(),
                status: key.status,
                grpc_status: key.grpc_status,
                peer: key.peer.clone(),
            })
            .clone();
        self.requests.rcu(|old| {
            let mut map = old.as_deref().cloned().unwrap_or_default();
            map.insert(key.clone(), counter.clone());
            Some(Arc::new(map))
        });
        counter
    }
}

/// Every route's series, by direction and route name, so that a reload finds the same ones
/// and a scrape finds them all.
#[derive(Default)]
pub struct RouteRegistry {
    series: Locked<HashMap<RouteKey, Arc<RouteSeries>>>,
}

/// Direction and route name.
type RouteKey = (&'static str, Arc<str>);

// Taken when a config is accepted and at each scrape, never by a request: requests use the
// handle their route holds.
#[allow(clippy::disallowed_types)]
type Locked<T> = std::sync::Mutex<T>;

impl RouteRegistry {
    pub fn get(&self, direction: &'static str, route: &Arc<str>) -> Arc<RouteSeries> {
        let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        series
            .entry((direction, route.clone()))
            .or_insert_with(|| Arc::new(RouteSeries::new(direction, route.clone())))
            .clone()
    }

    /// Appends the latency family, every route that has had a request, in a stable order.
    pub fn encode_durations(&self, out: &mut String) {
        const NAME: &str = "outrigger_request_duration_seconds";
        out.push_str(&format!(
            "# HELP {NAME} Time to the response head.\n# TYPE {NAME} histogram\n"
        ));
        let mut touched: Vec<Arc<RouteSeries>> = {
            let series = self.series.lock().unwrap_or_else(|e| e.into_inner());
            series
                .values()
                .filter(|s| s.duration.get().is_some())
                .cloned()
                .collect()
        };
        touched.sort_by(|a, b| (a.direction, &a.route).cmp(&(b.direction, &b.route)));
        for s in touched {
            if let Some(h) = s.duration.get() {
                let labels = format!(
                    "direction=\"{}\",route=\"{}\"",
                    s.direction,
                    escape(&s.route)
                );
                h.encode(out, NAME, &labels);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(status: u16, peer: Option<&str>) -> Outcome<'static> {
        Outcome {
            status,
            grpc_status: None,
            peer: peer.map(Arc::from),
            elapsed: Duration::from_millis(1),
            trace_id: None,
        }
    }

    #[test]
    fn a_route_counts_into_the_family_and_reuses_its_counters() {
        let registry = RouteRegistry::default();
        let family = Family::<RequestLabels, Counter>::default();
        let series = registry.get("inbound", &Arc::from("r"));
        for _ in 0..3 {
            series.record(&family, outcome(200, None));
        }
        series.record(&family, outcome(503, Some("spiffe://td/ns/a/sa/b")));
        let labels = |status, peer: &str| RequestLabels {
            direction: "inbound",
            route: Arc::from("r"),
            status,
            grpc_status: "",
            peer: Arc::from(peer),
        };
        assert_eq!(family.get_or_create(&labels(200, "")).get(), 3);
        assert_eq!(
            family
                .get_or_create(&labels(503, "spiffe://td/ns/a/sa/b"))
                .get(),
            1
        );
        assert_eq!(series.requests.load().as_ref().unwrap().len(), 2);
        assert!(Arc::ptr_eq(
            &series,
            &registry.get("inbound", &Arc::from("r"))
        ));
    }

    #[test]
    fn only_routes_that_served_a_request_are_encoded() {
        let registry = RouteRegistry::default();
        let family = Family::<RequestLabels, Counter>::default();
        registry.get("outbound", &Arc::from("idle"));
        registry
            .get("outbound", &Arc::from("busy"))
            .record(&family, outcome(200, None));
        let mut out = String::new();
        registry.encode_durations(&mut out);
        assert!(out.contains("route=\"busy\""), "{out}");
        assert!(!out.contains("route=\"idle\""), "{out}");
    }
}
