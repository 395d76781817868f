//! The access-log stage: one line per request, when the config asks for it, with the trace
//! it belongs to (ours if sampled, else the caller's, if any).

use http::{Method, Request, Response};

use crate::stack::exchange::Exchange;
use crate::stack::record::hex;
use crate::telemetry::trace_context;
use crate::upstream::client::Body;
use crate::upstream::error::ERROR_HEADER;

/// What the line needs from the request, taken before the request goes down the stack.
pub struct AccessLog {
    method: Method,
    path: String,
    caller_trace: Option<[u8; 16]>,
}

pub fn begin<B>(ex: &Exchange<'_>, req: &Request<B>) -> Option<AccessLog> {
    ex.snapshot.access_log.then(|| AccessLog {
        method: req.method().clone(),
        path: req.uri().path().to_string(),
        caller_trace: trace_context::extract(req.headers()).map(|c| c.trace_id),
    })
}

impl AccessLog {
    pub fn write(self, ex: &Exchange<'_>, response: &Response<Body>) {
        let trace_id = ex
            .trace
            .as_ref()
            .map(|t| t.span.trace_id)
            .or(self.caller_trace)
            .map(|id| hex(&id))
            .unwrap_or_default();
        let peer = ex.peer.identity_text.as_deref();
        tracing::info!(
            target: "access",
            direction = ex.ctx.direction,
            method = %self.method,
            path = self.path,
            route = ex.route_label(),
            status = response.status().as_u16(),
            duration_ms = ex.started.elapsed().as_secs_f64() * 1e3,
            peer = peer.unwrap_or(""),
            trace_id,
            error = response
                .headers()
                .get(ERROR_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
        );
    }
}
