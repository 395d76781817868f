//! The spans of one proxied request: the request's own (server on an inbound listener,
//! client on an outbound one) and one client span per attempt, each carrying what the proxy
//! decided: the endpoint, the attempt number, the backoff waited, an ejection, and the
//! reason for any response the proxy made itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method};

use crate::telemetry::metrics::Metrics;
use crate::telemetry::otlp::{
    self, SPAN_KIND_CLIENT, SPAN_KIND_SERVER, STATUS_ERROR, Span, Status,
};
use crate::telemetry::span_export::{Tracer, now_nanos};
use crate::telemetry::trace_context::{self, SpanContext, new_span_id, new_trace_id};

/// A sampled request in flight.
pub struct Trace {
    pub tracer: Arc<Tracer>,
    /// This request's span.
    pub span: SpanContext,
    /// The caller's span, if the request came with a context.
    pub parent: Option<[u8; 8]>,
    pub tracestate: String,
    pub start: u64,
}

impl Trace {
    /// Continues the caller's trace, or starts one (sampled at the route's ratio, else the
    /// proxy's); `None` when not sampled.
    pub fn start(tracer: &Arc<Tracer>, headers: &HeaderMap, ratio: Option<f64>) -> Option<Trace> {
        let parent = trace_context::extract(headers);
        let sampled = parent.map_or_else(
            || fastrand::f64() < ratio.unwrap_or(tracer.ratio),
            |p| p.sampled,
        );
        if !sampled {
            return None;
        }
        let span = match parent {
            Some(p) => p.child(),
            None => SpanContext {
                trace_id: new_trace_id(),
                span_id: new_span_id(),
                sampled: true,
            },
        };
        Some(Trace {
            tracer: tracer.clone(),
            span,
            parent: parent.map(|p| p.span_id),
            tracestate: headers
                .get(trace_context::TRACESTATE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            start: now_nanos(),
        })
    }

    fn span(&self, ctx: &SpanContext, parent: Option<[u8; 8]>, name: String, kind: i32) -> Span {
        Span {
            trace_id: ctx.trace_id.to_vec(),
            span_id: ctx.span_id.to_vec(),
            trace_state: self.tracestate.clone(),
            parent_span_id: parent.map(|p| p.to_vec()).unwrap_or_default(),
            name,
            kind,
            flags: 1,
            ..Default::default()
        }
    }
}

/// What the request span needs from the request and its outcome.
pub struct RequestFacts<'a> {
    pub inbound: bool,
    pub method: &'a Method,
    pub host: &'a str,
    pub route: &'a str,
    pub status: u16,
    pub client: Option<SocketAddr>,
    pub peer_identity: Option<String>,
    /// `x-outrigger-error`, when the proxy made the response.
    pub synthetic: Option<&'a str>,
}

pub fn record_request(trace: Trace, facts: RequestFacts<'_>, metrics: &Arc<Metrics>) {
    let kind = if facts.inbound {
        SPAN_KIND_SERVER
    } else {
        SPAN_KIND_CLIENT
    };
    let mut span = trace.span(
        &trace.span,
        trace.parent,
        format!("{} {}", facts.method, facts.route),
        kind,
    );
    span.start_time_unix_nano = trace.start;
    span.end_time_unix_nano = now_nanos();
    let mut attrs = vec![
        otlp::string("http.request.method", facts.method.as_str()),
        otlp::string("http.route", facts.route),
        otlp::int("http.response.status_code", i64::from(facts.status)),
        otlp::string("server.address", facts.host),
    ];
    if let Some(addr) = facts.client {
        attrs.push(otlp::string("network.peer.address", addr.ip().to_string()));
        attrs.push(otlp::int("network.peer.port", i64::from(addr.port())));
    }
    if let Some(id) = facts.peer_identity {
        attrs.push(otlp::string("outrigger.peer.identity", id));
    }
    if let Some(reason) = facts.synthetic {
        attrs.push(otlp::string("outrigger.synthetic_response", reason));
    }
    span.attributes = attrs;
    if facts.status >= 500 {
        span.status = Some(Status {
            message: facts.synthetic.unwrap_or_default().to_string(),
            code: STATUS_ERROR,
        });
    }
    let tracer = trace.tracer.clone();
    tracer.record(span, metrics);
}

/// One try at an endpoint, as a child of the request's span.
pub struct AttemptSpan {
    pub ctx: SpanContext,
    pub start: u64,
    pub number: u32,
    pub waited: Duration,
}

impl AttemptSpan {
    pub fn begin(trace: &Trace, number: u32, waited: Duration) -> AttemptSpan {
        AttemptSpan {
            ctx: trace.span.child(),
            start: now_nanos(),
            number,
            waited,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn end(
        self,
        trace: &Trace,
        metrics: &Arc<Metrics>,
        cluster: &str,
        endpoint: SocketAddr,
        outcome: Result<u16, &str>,
        ejected: bool,
    ) {
        let mut span = trace.span(
            &self.ctx,
            Some(trace.span.span_id),
            format!("attempt {}", self.number),
            SPAN_KIND_CLIENT,
        );
        span.start_time_unix_nano = self.start;
        span.end_time_unix_nano = now_nanos();
        let mut attrs = vec![
            otlp::int("outrigger.attempt", i64::from(self.number)),
            otlp::string("outrigger.upstream.cluster", cluster),
            otlp::string("outrigger.upstream.endpoint", endpoint.to_string()),
        ];
        if self.number > 1 {
            attrs.push(otlp::int(
                "outrigger.backoff_ms",
                self.waited.as_millis() as i64,
            ));
        }
        if ejected {
            attrs.push(otlp::string("outrigger.outlier", "ejected"));
        }
        match outcome {
            Ok(status) => {
                attrs.push(otlp::int("http.response.status_code", i64::from(status)));
                if status >= 500 {
                    span.status = Some(Status {
                        message: String::new(),
                        code: STATUS_ERROR,
                    });
                }
            }
            Err(reason) => {
                attrs.push(otlp::string("error.type", reason));
                span.status = Some(Status {
                    message: reason.to_string(),
                    code: STATUS_ERROR,
                });
            }
        }
        span.attributes = attrs;
        trace.tracer.record(span, metrics);
    }
}
