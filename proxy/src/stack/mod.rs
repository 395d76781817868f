//! The HTTP request path, as a stack of stages, each in its own file. [`handle`] assembles
//! them top to bottom, and is the one function to read to follow a request:
//!
//! ```text
//! access log → metrics → authorize → route → rate limit → timeout → retry → balance → pool
//! ```
//!
//! The config arrives as a handle (the `ArcSwap` snapshot), loaded once per request. What the
//! stages share, and what the inner ones tell the outer ones, flows down as one value, the
//! [`Exchange`](exchange::Exchange). Errors are not turned into responses by the stages: they
//! come back up to `handle`, the only place that calls `ProxyError::into_response`.
//!
//! The stages are plain async functions rather than tower services: each borrows the request's
//! snapshot (its route, its cluster) for the request's life, which tower's `'static` futures
//! cannot, and a boxed future per layer would cost an allocation per stage per request.

pub mod access_log;
pub mod authorize;
pub mod balance;
pub mod exchange;
pub mod headers;
pub mod idle;
pub mod mirror;
pub mod peer;
pub mod pool;
pub mod rate_limit;
pub mod record;
pub mod retry;
pub mod route;
pub mod timeout;
pub mod upgrade;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;

use crate::cluster::balance::pick_backend;
use crate::policy::circuit_breaker::Slot;
use crate::route::table::Route;
use crate::stack::exchange::{Call, Exchange, HttpContext};
use crate::stack::peer::Peer;
use crate::telemetry::request_trace::Trace;
use crate::upstream::client::Body;
use crate::upstream::error::ProxyError;
use crate::upstream::http1_pool::UpstreamBody;

/// One request, through the whole stack. This and the stages below return `async` blocks
/// rather than being `async fn`s, for the reason given at `retry::send`. The request comes
/// boxed: each layer of futures it passes through would otherwise keep room for all of it.
#[allow(clippy::manual_async_fn)] // one slot per argument, not two
pub fn handle(
    ctx: Arc<HttpContext>,
    peer: Arc<Peer>,
    req: Box<Request<Incoming>>,
) -> impl Future<Output = Result<Response<Body>, Infallible>> {
    async move {
        let snapshot = ctx.config.load_full();
        let mut ex = Exchange::new(&ctx, &snapshot, peer);
        // access log → metrics: what they need of the request is taken before it goes down.
        let access = access_log::begin(&ex, &req);
        let span = record::span_facts(&ex, &req);
        let tap = ctx.metrics.tap.begin(&req);
        let response = match forward(&ctx, &mut ex, req).await {
            Ok(resp) => resp,
            Err(err) => {
                let trace_id = ex.trace.as_ref().map(|t| record::hex(&t.span.trace_id));
                tracing::debug!(error = %err, side = ?err.side(), trace_id, "synthetic response");
                err.into_response()
            }
        };
        if let Some(access) = access {
            access.write(&ex, &response);
        }
        if let Some(tap) = tap {
            record::tap(&ex, tap, response.status().as_u16());
        }
        Ok(record::finish(ex, span, response))
    }
}

/// authorize → route → rate limit → (redirect, rewrite, mirror) → timeout → retry → balance →
/// pool, and the response back.
#[allow(clippy::manual_async_fn)] // one slot per argument, not two
fn forward<'a, 'b>(
    ctx: &'b Arc<HttpContext>,
    ex: &'b mut Exchange<'a>,
    req: Box<Request<Incoming>>,
) -> impl Future<Output = Result<Response<Body>, ProxyError>> {
    async move {
        // Everything up to sending is done by a plain function, so that its locals (the
        // request taken apart, its host, the call) take no room in this future: across the
        // await below it keeps only what the response needs.
        let Sending {
            tries,
            deadline,
            timeout,
            route,
            slot,
            downstream_upgrade,
            drain,
        } = match prepare(ctx, ex, *req)? {
            Prepared::Answered(resp) => return Ok(resp),
            Prepared::Sending(sending) => sending,
        };
        let mut resp = timeout::within(deadline, tries)
            .await
            .map_err(|_| timeout::expired(timeout))??;
        match downstream_upgrade.filter(|_| resp.status() == StatusCode::SWITCHING_PROTOCOLS) {
            Some(downstream) => {
                upgrade::tunnel(downstream, &mut resp, slot, drain, ex.listener.idle_timeout)
            }
            None => headers::strip_hop_by_hop(resp.headers_mut()),
        }
        route.response_headers.apply(resp.headers_mut());
        Ok(resp.map(|b| b.boxed()))
    }
}

/// A request routed and on its way, or answered by the proxy itself.
enum Prepared<'a, F> {
    Answered(Response<Body>),
    Sending(Sending<'a, F>),
}

/// A request's tries, and what its response needs once they end.
struct Sending<'a, F> {
    /// The tries, retries and backoffs, boxed: they are the largest part of a request's
    /// future, and each layer above would otherwise copy all of it once per request.
    tries: Pin<Box<F>>,
    deadline: tokio::time::Instant,
    timeout: std::time::Duration,
    route: &'a Route,
    /// The circuit breaker's slot, held until the response head.
    slot: Slot,
    downstream_upgrade: Option<OnUpgrade>,
    drain: Option<tokio::sync::mpsc::Sender<()>>,
}

/// authorize → route → rate limit → (redirect, rewrite, mirror) → timeout, and the tries set
/// up.
fn prepare<'a, 'b>(
    ctx: &'b Arc<HttpContext>,
    ex: &'b mut Exchange<'a>,
    req: Request<Incoming>,
) -> Result<
    Prepared<'a, impl Future<Output = Result<Response<UpstreamBody>, ProxyError>> + use<'a, 'b>>,
    ProxyError,
> {
    let (mut parts, body) = req.into_parts();
    authorize::authorize(ex, &mut parts)?;
    let host = route::request_host_of(&parts)?;
    let route = route::select(ex, host.as_str(), &parts)?;
    ex.route = Some(route);
    rate_limit::admit(ex, route)?;
    if let Some(redirect) = &route.redirect {
        let mut resp = redirect.respond(host.as_str(), &parts.uri, &route.path);
        route.response_headers.apply(resp.headers_mut());
        return Ok(Prepared::Answered(resp));
    }
    let host = match &route.rewrite {
        Some(rewrite) => route::rewrite(rewrite, &route.path, &mut parts, host)?,
        None => host,
    };
    // A copy of a request without a body goes now; one with a body once the body is read.
    let mirrored = !route.mirrors.is_empty();
    let bodiless = mirrored && mirror::bodiless(&body);
    if bodiless {
        mirror::copy(
            ctx,
            route,
            &mirror::head_of(&parts),
            &bytes::Bytes::new(),
            host.as_str(),
        );
    }
    let timeout = timeout::for_request(route.timeout, &parts.headers);
    let mut req = Request::from_parts(parts, body);
    if let Some(tracer) = &ex.snapshot.tracing {
        ex.trace = Trace::start(tracer, req.headers(), route.sampling);
    }
    let cluster = &pick_backend(&route.backends, route.total_weight).cluster;
    // Held until the response head: past the threshold, fail fast rather than queue.
    let Some(slot) = cluster.breaker.try_request() else {
        ex.ctx.metrics.overflow(&cluster.name, "requests");
        return Err(ProxyError::Overloaded {
            cluster: cluster.name.clone(),
            limit: "max_requests",
        });
    };
    let upgrade = route.websocket && headers::is_upgrade(&req);
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    // Only a tunnel outlives its request and needs its own hold on the drain.
    let drain = upgrade.then(|| ex.peer.drain.clone()).flatten();
    let policy = route.retry.as_deref().filter(|p| p.retries > 0 && !upgrade);
    // One clock read for the request's deadline, which the timeout and the retries' backoffs
    // both keep to.
    let deadline = tokio::time::Instant::now() + timeout;
    let (ctx_ref, trace) = (ex.ctx, ex.trace.as_ref());
    let tries = async move {
        let call = Call {
            ctx: ctx_ref,
            route,
            cluster,
            host: host.as_str(),
            trace,
        };
        if !mirrored || bodiless || upgrade {
            return retry::send(&call, policy, deadline, req, upgrade).await;
        }
        // Taken apart before the next await (as in `retry::send`).
        let (head, body) = match retry::replayable(req).await? {
            retry::Replay::Ready(head, body) => (head, body),
            retry::Replay::Once(req) => {
                mirror::skipped(ctx, route);
                return retry::send(&call, policy, deadline, req, upgrade).await;
            }
        };
        mirror::copy(ctx, route, &head, &body, host.as_str());
        retry::send_buffered(&call, policy, deadline, head, body).await
    };
    Ok(Prepared::Sending(Sending {
        tries: Box::pin(tries),
        deadline,
        timeout,
        route,
        slot,
        downstream_upgrade,
        drain,
    }))
}
