//! Prometheus metrics for the admin `/metrics` endpoint.
//!
//! Labels are bounded by config, never by traffic: route names come from the config file,
//! not from request paths, and no endpoint address becomes a label.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::telemetry::labels::{
    ClusterLabels, ConnectionLabels, DeniedLabels, DropLabels, ListenerLabels, OverflowLabels,
    RequestLabels, ResultLabels, RouteLabels, XdsLabels,
};
use crate::telemetry::route_series::{Outcome, RouteRegistry, RouteSeries};

fn latency_histogram() -> Histogram {
    // 0.5 ms … ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    /// Each route's request counters and latency histogram (the latter encoded by hand).
    routes: RouteRegistry,
    /// Where requests that matched no route are counted, by direction.
    unrouted: [Arc<RouteSeries>; 2],
    open_connections: Family<ListenerLabels, Gauge>,
    connection_rests: Family<ListenerLabels, Counter>,
    connections: Family<ConnectionLabels, Counter>,
    connection_errors: Family<ListenerLabels, Counter>,
    tcp_bytes: Family<ListenerLabels, Counter>,
    reloads: Family<ResultLabels, Counter>,
    config_version: Gauge,
    retries: Family<RouteLabels, Counter>,
    backoff: Family<RouteLabels, Histogram, fn() -> Histogram>,
    budget_exhausted: Family<ClusterLabels, Counter>,
    overflows: Family<OverflowLabels, Counter>,
    ejections: Family<ClusterLabels, Counter>,
    ejected: Family<ClusterLabels, Gauge>,
    rate_limited: Family<RouteLabels, Counter>,
    tls_failures: Family<ListenerLabels, Counter>,
    plaintext_refused: Family<ListenerLabels, Counter>,
    foreign_refused: Family<ListenerLabels, Counter>,
    denied: Family<DeniedLabels, Counter>,
    spans_exported: Counter,
    spans_dropped: Family<DropLabels, Counter>,
    xds_version: Family<XdsLabels, Gauge>,
    xds_last_update: Family<XdsLabels, Gauge>,
    xds_nacks: Family<XdsLabels, Counter>,
    xds_reconnects: Counter,
    admin_refused: Counter,
    /// Live requests for `/tap`'s watchers.
    pub tap: Arc<crate::telemetry::tap::TapHub>,
    /// Taps refused: a caller not in `admin.tap_from`, or too many watchers.
    pub tap_refused: Counter,
    /// When the workload certificate ends (Unix seconds); set at each scrape.
    pub identity_expiry: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The connection counters of one listener.
pub struct ConnectionSeries {
    pub open: Gauge,
    /// Times a quiet HTTP/1 connection rested (`listener::rest`).
    pub rested: Counter,
    opened: [(&'static str, Counter); 4],
}

impl ConnectionSeries {
    /// Counts a connection by the protocol it turned out to speak.
    pub fn opened(&self, protocol: &str) {
        if let Some((_, counter)) = self.opened.iter().find(|(p, _)| *p == protocol) {
            counter.inc();
        }
    }
}

/// The series one listener implies, declared at zero when a config is accepted.
pub struct ListenerSeries<'a> {
    pub name: &'a str,
    pub direction: &'static str,
    pub tls: bool,
    pub authorization: bool,
    /// Each route's name, and whether a rate limit applies to it.
    pub routes: Vec<(&'a str, bool)>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("outrigger");
        let requests = Family::<RequestLabels, Counter>::default();
        let routes = RouteRegistry::default();
        let none: Arc<str> = Arc::from("none");
        let unrouted = [routes.get("inbound", &none), routes.get("outbound", &none)];
        let open_connections = Family::<ListenerLabels, Gauge>::default();
        let connection_rests = Family::<ListenerLabels, Counter>::default();
        let connections = Family::<ConnectionLabels, Counter>::default();
        let connection_errors = Family::<ListenerLabels, Counter>::default();
        let tcp_bytes = Family::<ListenerLabels, Counter>::default();
        let reloads = Family::<ResultLabels, Counter>::default();
        let config_version = Gauge::default();
        let retries = Family::<RouteLabels, Counter>::default();
        let backoff = Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "retry_backoff_seconds",
            "How long each retry waited before it was sent (backoff or Retry-After)",
            backoff.clone(),
        );
        let budget_exhausted = Family::<ClusterLabels, Counter>::default();
        let overflows = Family::<OverflowLabels, Counter>::default();
        let ejections = Family::<ClusterLabels, Counter>::default();
        let ejected = Family::<ClusterLabels, Gauge>::default();
        let rate_limited = Family::<RouteLabels, Counter>::default();
        let tls_failures = Family::<ListenerLabels, Counter>::default();
        let plaintext_refused = Family::<ListenerLabels, Counter>::default();
        let foreign_refused = Family::<ListenerLabels, Counter>::default();
        let denied = Family::<DeniedLabels, Counter>::default();
        let xds_version = Family::<XdsLabels, Gauge>::default();
        let xds_last_update = Family::<XdsLabels, Gauge>::default();
        let xds_nacks = Family::<XdsLabels, Counter>::default();
        let xds_reconnects = Counter::default();
        let admin_refused = Counter::default();
        let tap_refused = Counter::default();
        let identity_expiry = Gauge::default();
        registry.register(
            "identity_expiry_timestamp_seconds",
            "When this proxy's workload certificate ends, Unix time (0 without one)",
            identity_expiry.clone(),
        );
        registry.register(
            "tap_refused",
            "Taps refused on the admin port: a caller not allowed to tap, or too many watchers",
            tap_refused.clone(),
        );
        registry.register(
            "admin_connections_refused",
            "Connections to the admin port closed at once: it was at its connection cap",
            admin_refused.clone(),
        );
        registry.register(
            "xds_reconnects",
            "ADS streams lost (closed, broken or silent past the keepalive) and redialled",
            xds_reconnects.clone(),
        );
        registry.register(
            "xds_version",
            "The accepted version of each xDS type (numeric versions; 0 otherwise)",
            xds_version.clone(),
        );
        registry.register(
            "xds_last_update_timestamp_seconds",
            "When each xDS type was last accepted, Unix time",
            xds_last_update.clone(),
        );
        registry.register(
            "xds_nacks",
            "xDS responses refused, by type",
            xds_nacks.clone(),
        );
        let spans_exported = Counter::default();
        let spans_dropped = Family::<DropLabels, Counter>::default();
        registry.register(
            "spans_exported",
            "Spans the OTLP collector accepted",
            spans_exported.clone(),
        );
        registry.register(
            "spans_dropped",
            "Spans lost: the export queue was full, or the collector failed",
            spans_dropped.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "Inbound mTLS handshakes that failed (bad, expired or foreign certificates)",
            tls_failures.clone(),
        );
        registry.register(
            "plaintext_refused",
            "Plaintext connections closed by a strict mTLS listener",
            plaintext_refused.clone(),
        );
        registry.register(
            "foreign_connections_refused",
            "Connections to an outbound listener from another host, closed unread",
            foreign_refused.clone(),
        );
        registry.register(
            "authorization_denied",
            "Requests refused by authorization, by listener and caller identity",
            denied.clone(),
        );
        registry.register(
            "outlier_ejected_endpoints",
            "Endpoints ejected right now",
            ejected.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests answered 429 by a local rate limit, by direction and route",
            rate_limited.clone(),
        );
        registry.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection",
            ejections.clone(),
        );
        registry.register(
            "circuit_breaker_overflows",
            "Requests failed fast at a circuit-breaker threshold, by cluster and limit",
            overflows.clone(),
        );
        registry.register(
            "retries",
            "Retries sent, by direction and route",
            retries.clone(),
        );
        registry.register(
            "retry_budget_exhausted",
            "Retries not sent because the cluster's retry budget was spent",
            budget_exhausted.clone(),
        );
        registry.register(
            "requests",
            "HTTP requests by direction, route and status",
            requests.clone(),
        );
        registry.register(
            "open_connections",
            "Downstream connections now open",
            open_connections.clone(),
        );
        registry.register(
            "connections",
            "Downstream connections accepted, by protocol",
            connections.clone(),
        );
        registry.register(
            "connection_rests",
            "Quiet HTTP/1 keep-alive connections that gave back their buffers to wait for their next request",
            connection_rests.clone(),
        );
        registry.register(
            "connection_errors",
            "Downstream connections that ended in a protocol error (malformed or abandoned)",
            connection_errors.clone(),
        );
        registry.register(
            "tcp_bytes",
            "Bytes copied by opaque TCP proxying, both ways",
            tcp_bytes.clone(),
        );
        registry.register(
            "config_reloads",
            "Config loads by result (accepted or rejected)",
            reloads.clone(),
        );
        registry.register(
            "config_version",
            "Version of the config now serving",
            config_version.clone(),
        );
        Metrics {
            registry,
            requests,
            routes,
            unrouted,
            open_connections,
            connection_rests,
            connections,
            connection_errors,
            tcp_bytes,
            reloads,
            config_version,
            retries,
            backoff,
            budget_exhausted,
            overflows,
            ejections,
            ejected,
            rate_limited,
            tls_failures,
            plaintext_refused,
            foreign_refused,
            denied,
            spans_exported,
            spans_dropped,
            xds_version,
            xds_last_update,
            xds_nacks,
            xds_reconnects,
            admin_refused,
            tap: Arc::default(),
            tap_refused,
            identity_expiry,
        }
    }

    pub fn xds_accepted(&self, kind: &'static str, version: &str) {
        let labels = XdsLabels { resource: kind };
        self.xds_version
            .get_or_create(&labels)
            .set(version.parse().unwrap_or(0));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.xds_last_update.get_or_create(&labels).set(now);
    }

    pub fn declare_xds(&self, kind: &'static str) {
        let labels = XdsLabels { resource: kind };
        let _ = self.xds_nacks.get_or_create(&labels);
        let _ = self.xds_version.get_or_create(&labels);
        let _ = self.xds_last_update.get_or_create(&labels);
    }

    /// Brings the admin port's refusals up to `total` (the gate counts them; this reports).
    pub fn admin_refused(&self, total: u64) {
        let seen = self.admin_refused.get();
        if total > seen {
            self.admin_refused.inc_by(total - seen);
        }
    }

    pub fn xds_reconnect(&self) {
        self.xds_reconnects.inc();
    }

    pub fn xds_nacked(&self, kind: &'static str) {
        self.xds_nacks
            .get_or_create(&XdsLabels { resource: kind })
            .inc();
    }

    pub fn spans_exported(&self, n: u64) {
        self.spans_exported.inc_by(n);
    }

    pub fn spans_dropped(&self, reason: &'static str, n: u64) {
        self.spans_dropped
            .get_or_create(&DropLabels { reason })
            .inc_by(n);
    }

    pub fn tls_handshake_failure(&self, listener: &str) {
        self.tls_failures
            .get_or_create(&ListenerLabels {
                listener: listener.to_string(),
            })
            .inc();
    }

    pub fn plaintext_refused(&self, listener: &str) {
        self.plaintext_refused
            .get_or_create(&ListenerLabels {
                listener: listener.to_string(),
            })
            .inc();
    }

    pub fn foreign_refused(&self, listener: &str) {
        self.foreign_refused
            .get_or_create(&ListenerLabels {
                listener: listener.to_string(),
            })
            .inc();
    }

    pub fn denied(&self, listener: &str, peer: Option<&str>) {
        self.denied
            .get_or_create(&DeniedLabels {
                listener: listener.to_string(),
                peer: peer.unwrap_or("none").to_string(),
            })
            .inc();
    }

    /// Makes the series the config implies exist at zero, so that alerts on a rate see a
    /// series before the first event rather than an absent one.
    pub fn declare<'a>(
        &self,
        clusters: impl Iterator<Item = &'a str>,
        listeners: impl Iterator<Item = ListenerSeries<'a>>,
        tracing: bool,
    ) {
        for name in clusters {
            let cluster = ClusterLabels {
                cluster: name.to_string(),
            };
            let _ = self.budget_exhausted.get_or_create(&cluster);
            let _ = self.ejections.get_or_create(&cluster);
            for limit in ["requests", "retries", "pending", "connections"] {
                let _ = self.overflows.get_or_create(&OverflowLabels {
                    cluster: name.to_string(),
                    limit,
                });
            }
        }
        for l in listeners {
            let listener = ListenerLabels {
                listener: l.name.to_string(),
            };
            let _ = self.connection_errors.get_or_create(&listener);
            let _ = self.tcp_bytes.get_or_create(&listener);
            if l.direction == "outbound" {
                let _ = self.foreign_refused.get_or_create(&listener);
            }
            if l.tls {
                let _ = self.tls_failures.get_or_create(&listener);
                let _ = self.plaintext_refused.get_or_create(&listener);
            }
            if l.authorization {
                let _ = self.denied.get_or_create(&DeniedLabels {
                    listener: l.name.to_string(),
                    peer: "none".into(),
                });
            }
            for (route, rate_limited) in l.routes {
                let labels = RouteLabels {
                    direction: l.direction,
                    route: route.into(),
                };
                let _ = self.retries.get_or_create(&labels);
                if rate_limited {
                    let _ = self.rate_limited.get_or_create(&labels);
                }
            }
        }
        if tracing {
            for reason in ["queue_full", "export_failed"] {
                let _ = self.spans_dropped.get_or_create(&DropLabels { reason });
            }
        }
    }

    /// Set from the live config just before each scrape, so it is never stale.
    pub fn set_ejected(&self, cluster: &str, endpoints: usize) {
        self.ejected
            .get_or_create(&ClusterLabels {
                cluster: cluster.to_string(),
            })
            .set(endpoints as i64);
    }

    pub fn rate_limited(&self, direction: &'static str, route: &str) {
        self.rate_limited
            .get_or_create(&RouteLabels {
                direction,
                route: route.into(),
            })
            .inc();
    }

    /// The series `route` writes to, the same ones across reloads.
    pub fn route_series(&self, direction: &'static str, route: &Arc<str>) -> Arc<RouteSeries> {
        self.routes.get(direction, route)
    }

    /// Where a request that matched no route is counted.
    pub fn unrouted(&self, direction: &'static str) -> &Arc<RouteSeries> {
        &self.unrouted[usize::from(direction == "outbound")]
    }

    pub fn record_request(&self, series: &RouteSeries, outcome: Outcome<'_>) {
        // The route's load report counts requests, not tries: what its callers saw.
        series.load.issued();
        series.load.finished(outcome.status < 500, outcome.elapsed);
        series.record(&self.requests, outcome);
    }

    pub fn retry(&self, direction: &'static str, route: &str, waited: Duration) {
        let labels = RouteLabels {
            direction,
            route: route.into(),
        };
        self.retries.get_or_create(&labels).inc();
        self.backoff
            .get_or_create(&labels)
            .observe(waited.as_secs_f64());
    }

    pub fn retry_budget_exhausted(&self, cluster: &str) {
        self.budget_exhausted
            .get_or_create(&ClusterLabels {
                cluster: cluster.to_string(),
            })
            .inc();
    }

    pub fn ejection(&self, cluster: &str) {
        self.ejections
            .get_or_create(&ClusterLabels {
                cluster: cluster.to_string(),
            })
            .inc();
    }

    pub fn overflow(&self, cluster: &str, limit: &'static str) {
        self.overflows
            .get_or_create(&OverflowLabels {
                cluster: cluster.to_string(),
                limit,
            })
            .inc();
    }

    /// A listener's connection series, found once: listeners are fixed for the process's
    /// life, so accepting a connection looks nothing up.
    pub fn connection_series(&self, listener: &str) -> ConnectionSeries {
        let opened = ["http1", "http2", "tls", "opaque"].map(|protocol| {
            let labels = ConnectionLabels {
                listener: listener.to_string(),
                protocol,
            };
            (protocol, self.connections.get_or_create(&labels).clone())
        });
        let labels = ListenerLabels {
            listener: listener.to_string(),
        };
        ConnectionSeries {
            open: self.open_connections.get_or_create(&labels).clone(),
            rested: self.connection_rests.get_or_create(&labels).clone(),
            opened,
        }
    }

    pub fn connection_error(&self, listener: &str) {
        self.connection_errors
            .get_or_create(&ListenerLabels {
                listener: listener.to_string(),
            })
            .inc();
    }

    pub fn tcp_bytes(&self, listener: &str, n: u64) {
        self.tcp_bytes
            .get_or_create(&ListenerLabels {
                listener: listener.to_string(),
            })
            .inc_by(n);
    }

    pub fn config_reload(&self, accepted: bool, version: u64) {
        let result = if accepted { "accepted" } else { "rejected" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
        if accepted {
            self.config_version.set(version as i64);
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        // The latency family goes before the end marker.
        let end = out.strip_suffix("# EOF\n").map_or(out.len(), str::len);
        out.truncate(end);
        self.routes.encode_durations(&mut out);
        out.push_str("# EOF\n");
        out
    }
}
