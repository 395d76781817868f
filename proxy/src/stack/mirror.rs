//! The mirror stage: a copy of the request to each of the route's mirror clusters (a share of
//! requests each), sent on its own and never waited for; its answer is read and dropped.
//!
//! A request with a body is copied when the body is small enough to hold (64 KiB, by its
//! `Content-Length`, as for a retry): it is read first, then sent to both. A larger one, or
//! one of unknown length, streams to its backend alone, and that is counted.

use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http_body_util::BodyExt;

use crate::route::router::PathMatch;
use crate::route::table::{HeaderChanges, Route};
use crate::stack::balance;
use crate::stack::exchange::{Call, HttpContext};
use crate::stack::retry::Head;

/// What a copy goes through: no header changes of its own (the original route's are applied
/// to the copy first), no retries.
static MIRROR_ROUTE: LazyLock<Route> = LazyLock::new(|| Route {
    name: Arc::from("mirror"),
    path: PathMatch::Prefix("/".into()),
    headers: Box::default(),
    methods: Box::default(),
    query: Box::default(),
    backends: Vec::new(),
    total_weight: 0,
    rewrite: None,
    redirect: None,
    mirrors: Box::default(),
    timeout: Duration::from_secs(15),
    request_headers: HeaderChanges::default(),
    response_headers: HeaderChanges::default(),
    retry: None,
    rate_limit: None,
    sampling: None,
    websocket: false,
    series: OnceLock::new(),
});

/// The head of a request, for copies.
pub fn head_of(parts: &Parts) -> Head {
    Head {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
    }
}

/// Counts, for each of `route`'s mirrors, a request not copied because its body could not be
/// held.
pub fn skipped(ctx: &HttpContext, route: &Route) {
    for mirror in &route.mirrors {
        ctx.metrics.overflow(&mirror.cluster.name, "mirror_body");
    }
}

/// Sends copies of the request (`head` and its whole `body`) to `route`'s mirrors, to `host`.
pub fn copy(ctx: &Arc<HttpContext>, route: &Route, head: &Head, body: &Bytes, host: &str) {
    for mirror in &route.mirrors {
        if mirror.percent < 100.0 && fastrand::f64() * 100.0 >= mirror.percent {
            continue;
        }
        let mut req = head.request(body.clone());
        route.request_headers.apply(req.headers_mut());
        let (ctx, cluster, host) = (ctx.clone(), mirror.cluster.clone(), host.to_string());
        let timeout = route.timeout;
        tokio::spawn(async move {
            let call = Call {
                ctx: &ctx,
                route: &MIRROR_ROUTE,
                cluster: &cluster,
                host: &host,
                trace: None,
            };
            let sent = tokio::time::timeout(timeout, balance::send_once(&call, req, false)).await;
            if let Ok(Ok(resp)) = sent {
                // Read to its end, so that its connection goes back to the pool.
                let _ = tokio::time::timeout(timeout, resp.into_body().collect()).await;
            }
        });
    }
}

/// A request whose body has ended before it began.
pub fn bodiless(body: &impl hyper::body::Body) -> bool {
    body.is_end_stream()
}
