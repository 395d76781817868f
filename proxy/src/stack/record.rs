//! The metrics stage: every request is counted once with its route, status, gRPC status,
//! caller and latency, and its span (if traced) is recorded. A gRPC status that comes in the
//! trailers is counted when they go by.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header;
use http::{Method, Request, Response};
use http_body_util::BodyExt;

use crate::policy::retry::GRPC_STATUS;
use crate::stack::exchange::Exchange;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::request_trace::{self, RequestFacts};
use crate::telemetry::route_series::{Outcome, RouteSeries};
use crate::telemetry::tap::{TapEvent, TapStart};
use crate::upstream::client::Body;
use crate::upstream::error::ERROR_HEADER;

/// What the request's span needs after the request itself is gone.
pub struct SpanFacts {
    method: Method,
    host: String,
}

/// Only taken when the proxy traces at all.
pub fn span_facts<B>(ex: &Exchange<'_>, req: &Request<B>) -> Option<SpanFacts> {
    ex.snapshot.tracing.as_ref()?;
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default();
    Some(SpanFacts {
        method: req.method().clone(),
        host,
    })
}

/// Records the request, now or when its gRPC trailers go by, and ends its span.
pub fn finish(
    ex: Exchange<'_>,
    facts: Option<SpanFacts>,
    response: Response<Body>,
) -> Response<Body> {
    let status = response.status().as_u16();
    let route = ex.route_label();
    let metrics = &ex.ctx.metrics;
    let series = match ex.route {
        Some(r) => r
            .series
            .get()
            .cloned()
            // A config built outside the store (a test's) has not been handed its series.
            .unwrap_or_else(|| metrics.route_series(ex.ctx.direction, &r.name)),
        None => metrics.unrouted(ex.ctx.direction).clone(),
    };
    let peer_identity = ex.peer.identity_text.clone();
    let record = PendingRecord {
        metrics: metrics.clone(),
        series,
        status,
        peer: peer_identity,
        elapsed: ex.started.elapsed(),
        trace_id: ex.trace.as_ref().map(|t| hex(&t.span.trace_id)),
    };
    let headers = response.headers();
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    let response = match headers.get(GRPC_STATUS).and_then(|v| v.to_str().ok()) {
        // A gRPC status after messages arrives in the trailers: count the call then.
        None if grpc => response.map(|inner| {
            GrpcStatusBody {
                inner,
                record: Some(record),
                grpc_status: None,
            }
            .boxed()
        }),
        grpc_status => {
            let grpc_status = grpc_status.map(str::to_string);
            record.finish(grpc_status.as_deref());
            response
        }
    };
    if let (Some(trace), Some(facts)) = (ex.trace, facts) {
        let peer = &ex.peer;
        let facts = RequestFacts {
            inbound: ex.ctx.direction == "inbound",
            method: &facts.method,
            host: &facts.host,
            route,
            status,
            client: peer.addr,
            peer_identity: peer.identity_text.as_deref().map(str::to_string),
            synthetic: response
                .headers()
                .get(ERROR_HEADER)
                .and_then(|v| v.to_str().ok()),
        };
        request_trace::record_request(trace, facts, &ex.ctx.metrics);
    }
    response
}

/// Shows the finished request to whoever taps the proxy.
pub fn tap(ex: &Exchange<'_>, start: TapStart, status: u16) {
    ex.ctx.metrics.tap.publish(TapEvent {
        direction: ex.ctx.direction,
        method: start.method.to_string(),
        authority: start.authority,
        path: start.path,
        status,
        latency_ms: ex.started.elapsed().as_secs_f64() * 1e3,
        route: ex.route_label().to_string(),
        caller: ex.peer.identity_text.as_deref().map(str::to_string),
        caller_address: ex.peer.addr.map(|a| a.to_string()),
        trace_id: ex.trace.as_ref().map(|t| hex(&t.span.trace_id)),
    });
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A request's metrics, waiting for its outcome.
struct PendingRecord {
    metrics: Arc<Metrics>,
    series: Arc<RouteSeries>,
    status: u16,
    peer: Option<Arc<str>>,
    elapsed: Duration,
    trace_id: Option<String>,
}

impl PendingRecord {
    fn finish(self, grpc_status: Option<&str>) {
        self.metrics.record_request(
            &self.series,
            Outcome {
                status: self.status,
                grpc_status,
                peer: self.peer,
                elapsed: self.elapsed,
                trace_id: self.trace_id,
            },
        );
    }
}

/// A gRPC response body that records its call once the trailers (or the end) go by.
struct GrpcStatusBody {
    inner: Body,
    record: Option<PendingRecord>,
    grpc_status: Option<String>,
}

impl hyper::body::Body for GrpcStatusBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(status) = frame
                    .trailers_ref()
                    .and_then(|t| t.get(GRPC_STATUS))
                    .and_then(|v| v.to_str().ok())
                {
                    self.grpc_status = Some(status.to_string());
                }
            }
            std::task::Poll::Ready(None) => {
                if let Some(record) = self.record.take() {
                    let status = self.grpc_status.take();
                    record.finish(status.as_deref());
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for GrpcStatusBody {
    fn drop(&mut self) {
        // The client went away before the end: the call is still counted, status unknown.
        if let Some(record) = self.record.take() {
            let status = self.grpc_status.take();
            record.finish(Some(status.as_deref().unwrap_or("unknown")));
        }
    }
}
