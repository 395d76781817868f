//! The balance stage: one try at one endpoint, chosen by the cluster's balancer, with what
//! the try says about the endpoint's health fed back to outlier detection and the try's own
//! span.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::header;
use http::{Request, Response, StatusCode};

use crate::cluster::balance::Endpoint;
use crate::policy::outlier::Health;
use crate::policy::retry::retry_after;
use crate::stack::exchange::Call;
use crate::stack::headers;
use crate::stack::pool;
use crate::stack::timeout;
use crate::telemetry::request_trace::AttemptSpan;
use crate::telemetry::trace_context;
use crate::upstream::client::Body;
use crate::upstream::error::ProxyError;
use crate::upstream::http1_pool::UpstreamBody;

#[allow(clippy::manual_async_fn)] // one slot per argument, not two
pub fn send_once<'a>(
    call: &'a Call<'a>,
    req: Request<Body>,
    upgrade: bool,
) -> impl Future<Output = Result<Response<UpstreamBody>, ProxyError>> {
    async move {
        let endpoint = call.cluster.pick().ok_or_else(|| ProxyError::NoEndpoint {
            cluster: call.cluster.name.clone(),
        })?;
        let try_ = Try {
            number: 1,
            waited: Duration::ZERO,
            per_try_timeout: None,
        };
        attempt(call, endpoint, req, upgrade, try_).await
    }
}

/// Which try this is, for retries and for its span.
pub struct Try {
    pub number: u32,
    pub waited: Duration,
    pub per_try_timeout: Option<Duration>,
}

/// One try at one endpoint. A function returning an `async` block, for the reason given at
/// `retry::send`.
#[allow(clippy::manual_async_fn)] // one slot per argument, not two
pub fn attempt<'a>(
    call: &'a Call<'a>,
    endpoint: &'a Arc<Endpoint>,
    mut req: Request<Body>,
    upgrade: bool,
    try_: Try,
) -> impl Future<Output = Result<Response<UpstreamBody>, ProxyError>> {
    async move {
        let Call {
            ctx,
            route,
            cluster,
            host,
            trace,
        } = *call;
        let per_try_timeout = try_.per_try_timeout;
        let span = trace.map(|t| AttemptSpan::begin(t, try_.number, try_.waited));
        headers::rewrite_request(&mut req, route, host, cluster.protocol, upgrade)?;
        if let Some(span) = &span {
            // The upstream's parent is this attempt.
            trace_context::inject(req.headers_mut(), &span.ctx);
        }
        // An HTTP/1.1 request needs a connection to itself until its response head.
        let _connection = pool::connection(call, upgrade).await?;
        let in_flight = endpoint.start();
        let send = pool::send(call, endpoint, req, upgrade);
        let result = match per_try_timeout {
            // An `Alarm`, as the request's timeout is: the try's many wakes do not each poll
            // its timer in full.
            Some(t) => timeout::within(tokio::time::Instant::now() + t, send)
                .await
                .unwrap_or(Err(ProxyError::UpstreamTimeout { after: t })),
            None => send.await,
        };
        // 429, or a 503 that says when to come back, is a load signal, not a failure: it never
        // counts toward ejection (the balancer steers around it instead).
        let health = match &result {
            Ok(resp) if overloaded(resp) => None,
            Ok(resp) if matches!(resp.status().as_u16(), 502..=504) => Some(Health::GatewayFailure),
            Ok(resp) if resp.status().is_server_error() => Some(Health::ServerError),
            Ok(_) => Some(Health::Success),
            Err(
                ProxyError::UpstreamConnect { .. }
                | ProxyError::UpstreamTimeout { .. }
                | ProxyError::UpstreamFailed { .. },
            ) => Some(Health::GatewayFailure),
            Err(_) => None,
        };
        // As Envoy's load reports count it: a 5xx or no answer is an error, anything else a
        // success.
        let answered = in_flight.answered();
        match &result {
            Ok(resp) => in_flight.finished(!resp.status().is_server_error(), answered),
            Err(_) => in_flight.finished(false, answered),
        }
        let ejected = health.is_some_and(|h| cluster.observe(endpoint, h));
        if ejected {
            tracing::warn!(cluster = %cluster.name, endpoint = %endpoint.addr, ejections = endpoint.outlier.ejections(), "endpoint ejected");
            ctx.metrics.ejection(&cluster.name);
        }
        if let (Some(span), Some(trace)) = (span, trace) {
            let outcome = match &result {
                Ok(resp) => Ok(resp.status().as_u16()),
                Err(e) => Err(e.code()),
            };
            span.end(
                trace,
                &ctx.metrics,
                &cluster.name,
                endpoint.addr,
                outcome,
                ejected,
            );
        }
        let resp = result?;
        if overloaded(&resp) {
            in_flight.overloaded(retry_after(resp.headers()), answered);
        } else {
            in_flight.responded(answered);
        }
        Ok(resp)
    }
}

/// An answer that says the endpoint has too much to do right now.
fn overloaded<B>(resp: &Response<B>) -> bool {
    resp.status() == StatusCode::TOO_MANY_REQUESTS
        || (resp.status() == StatusCode::SERVICE_UNAVAILABLE
            && resp.headers().contains_key(header::RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_429_or_a_503_with_retry_after_is_load_not_failure() {
        let resp = |status: u16, retry_after: bool| {
            let mut b = Response::builder().status(status);
            if retry_after {
                b = b.header(header::RETRY_AFTER, "1");
            }
            b.body(()).unwrap()
        };
        assert!(overloaded(&resp(429, false)));
        assert!(overloaded(&resp(503, true)));
        assert!(!overloaded(&resp(503, false)));
        assert!(!overloaded(&resp(500, true)));
    }
}
