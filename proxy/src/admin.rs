//! The admin listener: `/live`, `/ready`, `/metrics`, `/config`, and `/tap` for whoever
//! `admin.tap_from` lets in.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::json;
use tokio::net::TcpListener;

use crate::config::snapshot::RuntimeConfig;
use crate::config::store::ConfigStore;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::tap::TapFilter;
use outrigger_core::bounded_server::{self, Gate, PeerAddr};

type AdminBody = BoxBody<Bytes, std::convert::Infallible>;

pub struct AdminState {
    pub store: Arc<ConfigStore>,
    pub metrics: Arc<Metrics>,
    /// True once listeners are bound on a valid config; false again while draining.
    pub ready: AtomicBool,
    /// The admin port's connection cap (and how often it refused).
    pub gate: Arc<Gate>,
}

/// Serves the admin port, bounded: probes and scrapes need few, short connections.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    let gate = state.gate.clone();
    bounded_server::serve(listener, gate, bounded_server::plaintext, move |req| {
        let state = state.clone();
        async move { respond(&state, &req) }
    })
    .await
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<AdminBody> {
    let mut resp = Response::new(Full::new(Bytes::from(body)).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}

fn respond(state: &AdminState, req: &Request<Incoming>) -> Response<AdminBody> {
    match req.uri().path() {
        "/tap" => tap(state, req),
        "/live" => text(StatusCode::OK, "text/plain", "live\n".into()),
        "/ready" => {
            // Not before the listeners are up, nor before a control plane (if any) has
            // delivered a complete config.
            // Nor, with mTLS, before it has a certificate to prove who it is.
            // An expired one proves nothing: peers refuse it.
            let config = state.store.current.load();
            let identity = config.identity.as_ref().map(|i| &i.store);
            let certified = identity.is_none_or(|s| {
                s.workload()
                    .is_some_and(|w| w.not_after > std::time::SystemTime::now())
            });
            if state.ready.load(Ordering::Relaxed) && state.store.is_synced() && certified {
                text(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                // Why, when the certificate is what is missing: the renewal's last error.
                let why = identity
                    .filter(|_| !certified)
                    .and_then(|s| s.last_error())
                    .map_or(String::new(), |e| format!(": no valid certificate: {e}"));
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready{why}\n"),
                )
            }
        }
        "/metrics" => {
            let config = state.store.current.load();
            config.declare_series(&state.metrics);
            if state.store.xds.is_some() {
                for resource in ["Cluster", "ClusterLoadAssignment", "RouteConfiguration"] {
                    state.metrics.declare_xds(resource);
                }
            }
            state.metrics.admin_refused(state.gate.refused());
            let expiry = config
                .identity
                .as_ref()
                .and_then(|i| i.store.workload())
                .and_then(|w| w.not_after.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs() as i64);
            state.metrics.identity_expiry.set(expiry);
            for (name, cluster) in &config.clusters {
                if cluster.outlier.is_some() {
                    let ejected = cluster
                        .endpoints
                        .iter()
                        .filter(|e| e.outlier.is_ejected())
                        .count();
                    state.metrics.set_ejected(name, ejected);
                }
            }
            text(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                state.metrics.encode(),
            )
        }
        "/config" => {
            let body = serde_json::to_string_pretty(&config_json(state)).unwrap_or_default();
            text(StatusCode::OK, "application/json", body + "\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "endpoints: /live /ready /metrics /config /tap\n".into(),
        ),
    }
}

/// Live requests as JSON lines, to a caller `admin.tap_from` allows, until it hangs up, its
/// `max` is reached, or the admin port's connection age limit ends it.
fn tap(state: &AdminState, req: &Request<Incoming>) -> Response<AdminBody> {
    let from = req.extensions().get::<PeerAddr>().map(|p| p.0.ip());
    let config = state.store.current.load();
    if !from.is_some_and(|ip| config.tap_from.iter().any(|c| c.contains(ip))) {
        state.metrics.tap_refused.inc();
        return text(
            StatusCode::FORBIDDEN,
            "text/plain",
            "tapping is allowed from admin.tap_from only (by default, the pod itself)\n".into(),
        );
    }
    let filter = match TapFilter::parse(req.uri().query()) {
        Ok(f) => f,
        Err(e) => return text(StatusCode::BAD_REQUEST, "text/plain", format!("tap: {e}\n")),
    };
    match state.metrics.tap.watch(filter) {
        Some(body) => {
            let mut resp = Response::new(body.boxed());
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/x-ndjson"),
            );
            resp
        }
        None => {
            state.metrics.tap_refused.inc();
            text(
                StatusCode::TOO_MANY_REQUESTS,
                "text/plain",
                "tap: too many watchers on this proxy\n".into(),
            )
        }
    }
}

fn config_json(state: &AdminState) -> serde_json::Value {
    let config = state.store.current.load();
    let rejection = state.store.last_rejection.load();
    json!({
        "version": config.version,
        "source": config.source,
        "loaded_at_unix": state.store.loaded_at_unix.load(Ordering::Relaxed),
        "last_error": rejection.as_ref().map(|r| json!({
            "message": r.error.to_string(),
            "file": r.error.file,
            "line": r.error.line,
            "column": r.error.column,
            "field": r.error.field,
            "at_unix": r.at_unix,
        })),
        "snapshot": snapshot_json(&config),
    })
}

fn snapshot_json(config: &RuntimeConfig) -> serde_json::Value {
    let mut clusters: Vec<_> = config.clusters.values().collect();
    clusters.sort_by(|a, b| a.name.cmp(&b.name));
    json!({
        "listeners": config.listeners.iter().map(|l| json!({
            "name": l.name,
            "address": l.address.to_string(),
            "direction": format!("{:?}", l.direction).to_lowercase(),
            "protocol": format!("{:?}", l.protocol).to_lowercase(),
            "tcp_cluster": l.tcp.as_ref().map(|t| t.cluster.name.clone()),
            "virtual_hosts": l.virtual_hosts.iter().map(|v| json!({
                "name": v.name,
                "domains": v.domains,
                "routes": v.routes.iter().map(|r| json!({
                    "name": &*r.name,
                    "timeout_ms": r.timeout.as_millis() as u64,
                    "backends": r.backends.iter().map(|b| json!({"cluster": b.cluster.name, "weight": b.weight})).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "clusters": clusters.iter().map(|c| json!({
            "name": c.name,
            "protocol": format!("{:?}", c.protocol).to_lowercase(),
            "lb": format!("{:?}", c.lb),
            "retry_tokens": c.retry_budget.throttle.tokens(),
            "endpoints": c.endpoints.iter().map(|e| json!({
                "address": e.addr.to_string(),
                "outstanding": e.outstanding(),
                "ejected": e.outlier.is_ejected(),
                "ejections": e.outlier.ejections(),
                "latency_estimate_ms": e.latency_estimate().as_secs_f64() * 1000.0,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}
