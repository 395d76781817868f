//! One proxied HTTP request, top to bottom: route, choose a backend and an endpoint, rewrite
//! the request, send it within the route's timeout, rewrite the response.
//!
//! Errors are not turned into responses here; they go back to `handle`, which is the only
//! place that calls `ProxyError::into_response`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;

use crate::cluster::balance::{Cluster, Endpoint, pick_backend};
use crate::config::file::UpstreamProtocol;
use crate::config::snapshot::{Route, RuntimeConfig};
use crate::policy::circuit_breaker::Overflow;
use crate::policy::outlier::Health;
use crate::policy::retry::{MAX_REPLAY_BODY, Outcome, RetryPolicy, retriable, retry_after};
use crate::route::router::{self, RouteOutcome};
use crate::stack::peer::Peer;
use crate::telemetry::metrics::{Metrics, RequestRecord};
use crate::telemetry::request_trace::{self, AttemptSpan, RequestFacts, Trace};
use crate::telemetry::trace_context;
use crate::upstream::client::Body;
use crate::upstream::error::ProxyError;

/// Tells the upstream which attempt this is (1 for the first).
pub const ATTEMPT_HEADER: &str = "x-outrigger-attempt";
/// Tells the app behind an mTLS listener the caller's verified SPIFFE ID.
pub const CLIENT_ID_HEADER: &str = "x-outrigger-client-id";

/// What every request on one listener shares.
pub struct HttpContext {
    pub config: Arc<ArcSwap<RuntimeConfig>>,
    /// Listeners are fixed for the life of the process, so the index is stable across swaps.
    pub listener: usize,
    pub direction: &'static str,
    pub metrics: Arc<Metrics>,
}

pub async fn handle(
    ctx: Arc<HttpContext>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    // One snapshot for the whole request: a config swap mid-request cannot tear it.
    let snapshot = ctx.config.load_full();
    // Whether this request is traced is decided once it is routed: a route may carry its
    // own sampling ratio, set centrally.
    let mut trace: Option<Trace> = None;
    // What the span needs after the request itself is gone.
    let facts = snapshot.tracing.as_ref().map(|_| {
        let peer = req.extensions().get::<Peer>().cloned();
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
        (req.method().clone(), host, peer)
    });
    // The trace a log line belongs to: ours if sampled, else the caller's, if any.
    let access = snapshot.access_log.then(|| {
        let caller_trace = trace_context::extract(req.headers()).map(|c| c.trace_id);
        (
            req.method().clone(),
            req.uri().path().to_string(),
            caller_trace,
        )
    });
    let peer_identity = req
        .extensions()
        .get::<Peer>()
        .and_then(|p| p.identity.as_ref().map(|i| i.to_string()));
    let mut route_label = "none";
    let mut response = match forward(&ctx, &snapshot, req, &mut route_label, &mut trace).await {
        Ok(resp) => resp,
        Err(err) => {
            let trace_id = trace.as_ref().map(|t| hex(&t.span.trace_id));
            tracing::debug!(error = %err, side = ?err.side(), trace_id, "synthetic response");
            err.into_response()
        }
    };
    let status = response.status().as_u16();
    if let Some((method, path, caller_trace)) = access {
        let trace_id = trace
            .as_ref()
            .map(|t| t.span.trace_id)
            .or(caller_trace)
            .map(|id| hex(&id))
            .unwrap_or_default();
        tracing::info!(
            target: "access",
            direction = ctx.direction,
            %method,
            path,
            route = route_label,
            status,
            duration_ms = started.elapsed().as_secs_f64() * 1e3,
            peer = peer_identity.as_deref().unwrap_or(""),
            trace_id,
            error = response
                .headers()
                .get(crate::upstream::error::ERROR_HEADER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or(""),
        );
    }
    let record = PendingRecord {
        metrics: ctx.metrics.clone(),
        direction: ctx.direction,
        route: route_label.to_string(),
        status,
        peer: peer_identity,
        elapsed: started.elapsed(),
        trace_id: trace.as_ref().map(|t| hex(&t.span.trace_id)),
    };
    let headers = response.headers();
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    match headers.get("grpc-status").and_then(|v| v.to_str().ok()) {
        // A gRPC status after messages arrives in the trailers: count the call then.
        None if grpc => {
            response = response.map(|inner| {
                GrpcStatusBody {
                    inner,
                    record: Some(record),
                    grpc_status: None,
                }
                .boxed()
            });
        }
        grpc_status => {
            let grpc_status = grpc_status.map(str::to_string);
            record.finish(grpc_status.as_deref());
        }
    }
    if let (Some(trace), Some((method, host, peer))) = (trace, facts) {
        let facts = RequestFacts {
            inbound: ctx.direction == "inbound",
            method: &method,
            host: &host,
            route: route_label,
            status,
            client: peer.as_ref().and_then(|p| p.addr),
            peer_identity: peer.and_then(|p| p.identity.map(|i| i.to_string())),
            synthetic: response
                .headers()
                .get(crate::upstream::error::ERROR_HEADER)
                .and_then(|v| v.to_str().ok()),
        };
        request_trace::record_request(trace, facts, &ctx.metrics);
    }
    Ok(response)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A request's metrics, waiting for its outcome.
struct PendingRecord {
    metrics: Arc<Metrics>,
    direction: &'static str,
    route: String,
    status: u16,
    peer: Option<String>,
    elapsed: Duration,
    trace_id: Option<String>,
}

impl PendingRecord {
    fn finish(self, grpc_status: Option<&str>) {
        self.metrics.record_request(RequestRecord {
            direction: self.direction,
            route: &self.route,
            status: self.status,
            grpc_status,
            peer: self.peer.as_deref(),
            elapsed: self.elapsed,
            trace_id: self.trace_id,
        });
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
                    .and_then(|t| t.get("grpc-status"))
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

async fn forward<'a>(
    ctx: &HttpContext,
    snapshot: &'a RuntimeConfig,
    mut req: Request<Incoming>,
    route_label: &mut &'a str,
    trace: &mut Option<Trace>,
) -> Result<Response<Body>, ProxyError> {
    let listener = &snapshot.listeners[ctx.listener];
    let peer = req
        .extensions()
        .get::<Peer>()
        .and_then(|p| p.identity.clone());
    let fallback_host = req.extensions().get::<Peer>().and_then(|p| p.virtual_host);
    if let Some(authz) = &listener.authorization
        && !authz.allows(peer.as_deref())
    {
        let peer = peer.map(|p| p.to_string());
        ctx.metrics.denied(&listener.name, peer.as_deref());
        return Err(ProxyError::Denied {
            peer: peer.unwrap_or_else(|| "without an identity".into()),
        });
    }
    // Only the proxy may say who the caller is: a header from the caller is a lie, on every
    // listener and in every spelling an app might fold into ours.
    let headers = req.headers_mut();
    strip_vouched(headers);
    if let Some(peer) = &peer
        && let Ok(value) = HeaderValue::from_str(&peer.to_string())
    {
        headers.insert(CLIENT_ID_HEADER, value);
    }
    let host = request_host(&req)?;
    let (parts, body) = req.into_parts();
    let mut routed = router::route(&listener.domains, &listener.virtual_hosts, &host, &parts);
    // A redirected connection whose Host names no service (an IP, say) is routed by the
    // address the app dialled.
    if let (RouteOutcome::NoVirtualHost, Some(i)) = (&routed, fallback_host)
        && let Some(vhost) = listener.virtual_hosts.get(i)
    {
        routed = router::route_in(vhost, &parts);
    }
    let route = match routed {
        RouteOutcome::Matched(_, route) => route,
        RouteOutcome::NoVirtualHost => return Err(ProxyError::NoVirtualHost { host }),
        RouteOutcome::NoRoute(_) => {
            return Err(ProxyError::NoRoute {
                host,
                path: parts.uri.path().to_string(),
            });
        }
    };
    *route_label = route.name.as_str();
    // The service's own limit first, then the route's: a request refused by either never
    // reaches a cluster, so it costs the upstream nothing.
    let limits = [
        (&listener.rate_limit, "listener", &listener.name),
        (&route.rate_limit, "route", &route.name),
    ];
    for (limiter, kind, name) in limits {
        if let Some(Err(retry_after)) = limiter.as_ref().map(|l| l.acquire()) {
            ctx.metrics.rate_limited(ctx.direction, &route.name);
            return Err(ProxyError::RateLimited {
                scope: format!("{kind} `{name}`"),
                retry_after,
            });
        }
    }
    // A gRPC client's deadline is a timeout the proxy can honour: past it, nobody is
    // waiting for the answer.
    let timeout = grpc_timeout(&parts.headers).map_or(route.timeout, |t| t.min(route.timeout));
    req = Request::from_parts(parts, body);
    if let Some(tracer) = &snapshot.tracing {
        *trace = Trace::start(tracer, req.headers(), route.sampling);
    }
    let trace = trace.as_ref();
    let cluster = &pick_backend(&route.backends, route.total_weight).cluster;
    // Held until the response head: past the threshold, fail fast rather than queue.
    let Some(slot) = cluster.breaker.try_request() else {
        ctx.metrics.overflow(&cluster.name, "requests");
        return Err(ProxyError::Overloaded {
            cluster: cluster.name.clone(),
            limit: "max_requests",
        });
    };

    let upgrade = route.websocket && is_upgrade(&req);
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    // Only a tunnel outlives its request and needs its own hold on the drain.
    let drain = upgrade
        .then(|| req.extensions().get::<Peer>().and_then(|p| p.drain.clone()))
        .flatten();
    let retry = route.retry.as_ref().filter(|p| p.retries > 0 && !upgrade);
    let call = Call {
        ctx,
        route,
        cluster,
        host: &host,
        trace,
    };
    let send = async {
        match retry {
            Some(policy) => match replayable(req).await? {
                Replay::Ready(head, body) => {
                    let deadline = tokio::time::Instant::now() + timeout;
                    send_with_retries(&call, policy, deadline, head, body).await
                }
                Replay::Once(req) => send_once(&call, req.map(|b| b.boxed()), false).await,
            },
            None => send_once(&call, req.map(|b| b.boxed()), upgrade).await,
        }
    };
    let mut resp = tokio::time::timeout(timeout, send)
        .await
        .map_err(|_| ProxyError::UpstreamTimeout { after: timeout })??;

    if let Some(downstream) =
        downstream_upgrade.filter(|_| resp.status() == StatusCode::SWITCHING_PROTOCOLS)
    {
        let upstream = hyper::upgrade::on(&mut resp);
        // The tunnel outlives the request: it keeps the cluster's request slot and holds off
        // the drain like any connection, and it is closed when idle like opaque TCP.
        let idle = listener.idle_timeout;
        tokio::spawn(async move {
            let (_slot, _draining) = (slot, drain);
            let (Ok(down), Ok(up)) = tokio::join!(downstream, upstream) else {
                return;
            };
            let _ = crate::net::splice::copy_with_idle_timeout(
                TokioIo::new(down),
                TokioIo::new(up),
                idle,
            )
            .await;
        });
    } else {
        strip_hop_by_hop(resp.headers_mut());
    }
    route.response_headers.apply(resp.headers_mut());
    Ok(resp.map(|b| b.boxed()))
}

async fn send_once(
    call: &Call<'_>,
    req: Request<Body>,
    upgrade: bool,
) -> Result<Response<Incoming>, ProxyError> {
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

/// Which try this is, for retries and for its span.
struct Try {
    number: u32,
    waited: Duration,
    per_try_timeout: Option<Duration>,
}

/// One try at one endpoint.
async fn attempt(
    call: &Call<'_>,
    endpoint: &Arc<Endpoint>,
    req: Request<Body>,
    upgrade: bool,
    try_: Try,
) -> Result<Response<Incoming>, ProxyError> {
    let Call {
        ctx,
        route,
        cluster,
        host,
        trace,
    } = *call;
    let per_try_timeout = try_.per_try_timeout;
    let span = trace.map(|t| AttemptSpan::begin(t, try_.number, try_.waited));
    let mut upstream_req = rewrite_request(
        req,
        route,
        &endpoint.base_uri,
        host,
        cluster.protocol,
        upgrade,
    )?;
    if let Some(span) = &span {
        // The upstream's parent is this attempt.
        trace_context::inject(upstream_req.headers_mut(), &span.ctx);
    }
    // An HTTP/1.1 request needs a connection to itself until its response head.
    let _connection = match (upgrade, cluster.protocol) {
        (false, UpstreamProtocol::Http1) => match cluster.breaker.connection().await {
            Ok(permit) => Some(permit),
            Err(Overflow::Pending) => {
                ctx.metrics.overflow(&cluster.name, "pending");
                return Err(ProxyError::Overloaded {
                    cluster: cluster.name.clone(),
                    limit: "max_pending",
                });
            }
        },
        _ => None,
    };
    let in_flight = endpoint.start();
    let send = async {
        match (upgrade, cluster.protocol) {
            (true, _) => {
                cluster
                    .client
                    .send_upgrade(&cluster.name, endpoint.addr, upstream_req)
                    .await
            }
            (false, UpstreamProtocol::Http1) => {
                cluster.client.send(&cluster.name, upstream_req).await
            }
            (false, UpstreamProtocol::Http2) => {
                let timeout = cluster.client.connect_timeout();
                let tls = cluster.tls.as_ref().map(|t| &t.config);
                endpoint
                    .h2
                    .send(&cluster.name, endpoint.addr, timeout, tls, upstream_req)
                    .await
            }
        }
    };
    let result = match per_try_timeout {
        Some(t) => tokio::time::timeout(t, send)
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
        in_flight.overloaded(retry_after(resp.headers()));
    } else {
        in_flight.responded();
    }
    Ok(resp)
}

/// An answer that says the endpoint has too much to do right now.
fn overloaded<B>(resp: &Response<B>) -> bool {
    resp.status() == StatusCode::TOO_MANY_REQUESTS
        || (resp.status() == StatusCode::SERVICE_UNAVAILABLE
            && resp.headers().contains_key(header::RETRY_AFTER))
}

/// What a retried request needs to be sent again.
struct Head {
    method: http::Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

enum Replay {
    Ready(Head, Bytes),
    /// Too large, or of unknown length: sent once, as it streams.
    Once(Request<Incoming>),
}

async fn replayable(req: Request<Incoming>) -> Result<Replay, ProxyError> {
    let length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let small = hyper::body::Body::is_end_stream(req.body())
        || length.is_some_and(|n| n <= MAX_REPLAY_BODY);
    if !small {
        return Ok(Replay::Once(req));
    }
    let (parts, body) = req.into_parts();
    let bytes = body
        .collect()
        .await
        .map_err(|_| ProxyError::BadRequest("the client stopped sending its body"))?
        .to_bytes();
    Ok(Replay::Ready(
        Head {
            method: parts.method,
            uri: parts.uri,
            version: parts.version,
            headers: parts.headers,
        },
        bytes,
    ))
}

/// Where one request is going, as every attempt at it needs to know.
#[derive(Clone, Copy)]
struct Call<'a> {
    ctx: &'a HttpContext,
    route: &'a Route,
    cluster: &'a Cluster,
    host: &'a str,
    trace: Option<&'a Trace>,
}

async fn send_with_retries(
    call: &Call<'_>,
    policy: &RetryPolicy,
    deadline: tokio::time::Instant,
    head: Head,
    body: Bytes,
) -> Result<Response<Incoming>, ProxyError> {
    let Call {
        ctx,
        route,
        cluster,
        ..
    } = *call;
    let _active = cluster.retry_budget.request();
    // A retry holds its budget slot until the next attempt ends, so concurrent retries are
    // what the budget counts.
    let mut _retry_slot = None;
    let mut avoid = None;
    let mut number = 0u32;
    let mut waited = Duration::ZERO;
    loop {
        let endpoint = cluster
            .pick_avoiding(avoid)
            .ok_or_else(|| ProxyError::NoEndpoint {
                cluster: cluster.name.clone(),
            })?;
        let mut req = Request::new(
            Full::new(body.clone())
                .map_err(|never| match never {})
                .boxed(),
        );
        *req.method_mut() = head.method.clone();
        *req.uri_mut() = head.uri.clone();
        *req.version_mut() = head.version;
        *req.headers_mut() = head.headers.clone();
        // The app may want to know it is seeing a retry (and log it).
        req.headers_mut()
            .insert(ATTEMPT_HEADER, HeaderValue::from(number + 1));
        let try_ = Try {
            number: number + 1,
            waited,
            per_try_timeout: policy.per_try_timeout,
        };
        let result = attempt(call, endpoint, req, false, try_).await;
        let outcome = match &result {
            Ok(resp) => Outcome::Response(resp.status(), resp.headers()),
            Err(ProxyError::UpstreamConnect { .. }) => Outcome::ConnectFailed,
            Err(ProxyError::UpstreamTimeout { .. }) => Outcome::TimedOut,
            Err(ProxyError::UpstreamFailed { refused: true, .. }) => Outcome::Refused,
            Err(ProxyError::UpstreamFailed { .. }) => Outcome::Reset,
            Err(_) => return result,
        };
        // How retries fare decides whether any more may go out (the cluster's throttle).
        let failed = retriable(&policy.on, &outcome);
        cluster.retry_budget.throttle.record(failed);
        if number >= policy.retries
            || !failed
            || !policy.allows(&head.method, &head.headers, &outcome)
        {
            return result;
        }
        // An upstream that says when to come back is taken at its word. If that is past the
        // deadline, its answer goes back now rather than a timeout later.
        let mut wait = policy.backoff(number);
        if let Ok(resp) = &result
            && let Some(asked) = retry_after(resp.headers())
        {
            if tokio::time::Instant::now()
                .checked_add(asked)
                .is_none_or(|at| at >= deadline)
            {
                return result;
            }
            wait = wait.max(asked);
        }
        let Some(slot) = cluster.retry_budget.try_retry() else {
            ctx.metrics.retry_budget_exhausted(&cluster.name);
            return result;
        };
        let Some(breaker_slot) = cluster.breaker.try_retry() else {
            ctx.metrics.overflow(&cluster.name, "retries");
            return result;
        };
        ctx.metrics.retry(ctx.direction, &route.name, wait);
        _retry_slot = Some((slot, breaker_slot));
        avoid = Some(endpoint.addr);
        drop(result);
        tokio::time::sleep(wait).await;
        waited = wait;
        number += 1;
    }
}

/// `grpc-timeout`: an integer of up to 8 digits and a unit (gRPC over HTTP/2, "Timeout").
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The host a request is for: `:authority` for HTTP/2 (and absolute-form HTTP/1), else `Host`.
/// When both are present they must agree: the proxy routes by one, and an app behind it may
/// read the other.
fn request_host(req: &Request<Incoming>) -> Result<String, ProxyError> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    if let Some(authority) = req.uri().authority() {
        let disagree = hosts.any(|h| {
            !h.as_bytes()
                .eq_ignore_ascii_case(authority.as_str().as_bytes())
        });
        if disagree {
            return Err(ProxyError::BadRequest(
                "Host and the request's authority disagree",
            ));
        }
        return Ok(authority.as_str().to_string());
    }
    let host = match (hosts.next(), hosts.next()) {
        (Some(h), None) => h,
        (None, _) => return Err(ProxyError::BadRequest("missing Host header")),
        (Some(_), Some(_)) => return Err(ProxyError::BadRequest("more than one Host header")),
    };
    let host = host
        .to_str()
        .map_err(|_| ProxyError::BadRequest("Host header is not ASCII"))?;
    host.parse::<http::uri::Authority>()
        .map_err(|_| ProxyError::BadRequest("Host header is not a valid authority"))?;
    Ok(host.to_string())
}

/// Whether this is an upgrade the proxy honours. Only WebSocket is: an `h2c` upgrade would
/// hand the rest of the connection to the app unrouted, and any other protocol is one the
/// proxy cannot vouch for. Their `Upgrade` header is removed as hop-by-hop, and the request
/// goes on as an ordinary one.
fn is_upgrade(req: &Request<Incoming>) -> bool {
    let websocket = |v: &HeaderValue| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("websocket"))
        })
    };
    req.version() == Version::HTTP_11
        && req.headers().get(header::UPGRADE).is_some_and(websocket)
        && req.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

fn rewrite_request(
    req: Request<Body>,
    route: &Route,
    base_uri: &str,
    host: &str,
    protocol: UpstreamProtocol,
    upgrade: bool,
) -> Result<Request<Body>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let invalid = |_| ProxyError::BadRequest("invalid request target");
    if !upgrade {
        strip_hop_by_hop(&mut parts.headers);
    }
    match protocol {
        UpstreamProtocol::Http1 => {
            // The pool connects to the URI's authority: the endpoint. The name the client
            // asked for rides in Host, which an HTTP/2 client did not send.
            parts.uri = Uri::try_from(format!("{base_uri}{path}")).map_err(invalid)?;
            parts.version = Version::HTTP_11;
            if !parts.headers.contains_key(header::HOST) {
                let value = HeaderValue::from_str(host)
                    .map_err(|_| ProxyError::BadRequest("invalid host"))?;
                parts.headers.insert(header::HOST, value);
            }
        }
        UpstreamProtocol::Http2 => {
            // The connection is already the endpoint's; the URI only supplies :authority.
            parts.uri = Uri::try_from(format!("http://{host}{path}")).map_err(invalid)?;
            parts.version = Version::HTTP_2;
            parts.headers.remove(header::HOST);
        }
    }
    route.request_headers.apply(&mut parts.headers);
    Ok(Request::from_parts(parts, body))
}

/// The headers the proxy vouches for. A caller's copy is removed before the proxy sets its
/// own, and a `Connection:` nomination cannot remove the proxy's.
const VOUCHED: [&str; 1] = [CLIENT_ID_HEADER];

/// Whether `name` is `vouched` as an app might read it: frameworks that map headers to
/// variables (CGI, WSGI, Rack, nginx) fold `_` into `-`, and names arrive lowercased.
fn spells(name: &str, vouched: &str) -> bool {
    name.len() == vouched.len()
        && name
            .bytes()
            .zip(vouched.bytes())
            .all(|(a, b)| a.to_ascii_lowercase() == b || (a == b'_' && b == b'-'))
}

fn is_vouched(name: &str) -> bool {
    VOUCHED.iter().any(|v| spells(name, v))
}

/// Removes every spelling of every vouched-for header.
fn strip_vouched(headers: &mut HeaderMap) {
    // Most requests carry none: look before allocating.
    if !headers.keys().any(|k| is_vouched(k.as_str())) {
        return;
    }
    let found: Vec<HeaderName> = headers
        .keys()
        .filter(|k| is_vouched(k.as_str()))
        .cloned()
        .collect();
    for name in found {
        headers.remove(name);
    }
}

/// Connection-scoped headers describe one hop and must not be forwarded (RFC 9110 §7.6.1).
/// `te: trailers` is the exception: gRPC needs it end to end.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        // The proxy's own headers are not the caller's to remove.
        .filter(|n| !VOUCHED.contains(&n.as_str()))
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHORIZATION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
    if headers.get(header::TE).is_some_and(|v| v != "trailers") {
        headers.remove(header::TE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        let parse = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", v.parse().unwrap());
            grpc_timeout(&h)
        };
        assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("100u"), Some(Duration::from_micros(100)));
        assert_eq!(parse("5x"), None);
        assert_eq!(parse("m"), None);
        assert_eq!(parse("123456789S"), None, "more than 8 digits");
    }

    #[test]
    fn every_spelling_of_a_vouched_header_is_stripped() {
        let mut h = HeaderMap::new();
        for name in [
            "x-outrigger-client-id",
            "x_outrigger_client_id",
            "x-outrigger_client-id",
        ] {
            h.append(
                name,
                "spiffe://cluster.local/ns/x/sa/admin".parse().unwrap(),
            );
        }
        h.insert("x-outrigger-client-idx", "kept".parse().unwrap());
        strip_vouched(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
    }

    #[test]
    fn a_connection_nomination_cannot_remove_a_vouched_header() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "x-outrigger-client-id, x-other".parse().unwrap(),
        );
        h.insert(
            CLIENT_ID_HEADER,
            "spiffe://cluster.local/ns/a/sa/a".parse().unwrap(),
        );
        h.insert("x-other", "gone".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert!(h.contains_key(CLIENT_ID_HEADER));
        assert!(!h.contains_key("x-other"));
    }
}
