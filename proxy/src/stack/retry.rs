//! The retry stage: a request whose body is small enough to keep is sent again, to another
//! endpoint, after an outcome its policy names, while the cluster's budget, throttle and
//! circuit breaker allow, with jittered backoff, and within the request's timeout.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Request, Response, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::policy::retry::{MAX_REPLAY_BODY, Outcome, RetryPolicy, retriable, retry_after};
use crate::stack::balance::{self, Try};
use crate::stack::exchange::Call;
use crate::stack::headers::{ATTEMPT_HEADER, attempt_value};
use crate::upstream::client::Body;
use crate::upstream::error::ProxyError;
use crate::upstream::http1_pool::UpstreamBody;

/// Sends the request: with retries when its route has a policy (and it is no upgrade), else
/// once.
///
/// This and the stages below it are plain functions returning an `async` block rather than
/// `async fn`s: an `async fn` keeps each argument twice in its future (as it was passed, and
/// as the local it is moved into when first polled), so a request passed down four stages
/// took eight slots of 240 bytes, all copied whenever the future moved.
#[allow(clippy::manual_async_fn)] // one slot per argument, not two
pub fn send<'a>(
    call: &'a Call<'a>,
    policy: Option<&'a RetryPolicy>,
    deadline: tokio::time::Instant,
    req: Request<Incoming>,
    upgrade: bool,
) -> impl Future<Output = Result<Response<UpstreamBody>, ProxyError>> {
    async move {
        let Some(policy) = policy else {
            return balance::send_once(call, req.map(|b| b.boxed()), upgrade).await;
        };
        // Taken apart before the next await, so that this future does not hold the
        // `Replay` (and the `?`'s copy of it) while the tries run.
        let (head, body) = match replayable(req).await? {
            Replay::Ready(head, body) => (head, body),
            Replay::Once(req) => {
                return balance::send_once(call, req.map(|b| b.boxed()), false).await;
            }
        };
        send_with_retries(call, policy, deadline, head, body).await
    }
}

/// What a retried (or mirrored) request needs to be sent again.
pub struct Head {
    pub method: http::Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
}

impl Head {
    /// A new request with this head and `body`.
    pub fn request(&self, body: Bytes) -> Request<Body> {
        self.request_with(self.headers.clone(), body)
    }

    /// A new request with this head and `body`, its header table moved rather than copied.
    pub fn into_request(mut self, body: Bytes) -> Request<Body> {
        let headers = std::mem::take(&mut self.headers);
        self.request_with(headers, body)
    }

    /// A new request with this head's method, URI and version, and `headers`.
    fn request_with(&self, headers: HeaderMap, body: Bytes) -> Request<Body> {
        let mut req = Request::new(Full::new(body).map_err(|never| match never {}).boxed());
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = headers;
        req
    }

    /// A request for the next try: it takes this head's own header table and leaves a copy
    /// in its place. The copy is sized to the byte, while the table the request arrived in
    /// has room to spare; the upstream connection reuses the table it was sent for the
    /// response it parses next, and one with no room grows on every response with more
    /// headers than its request.
    fn take_request(&mut self, body: Bytes) -> Request<Body> {
        let copy = self.headers.clone();
        let headers = std::mem::replace(&mut self.headers, copy);
        self.request_with(headers, body)
    }
}

/// Sends a request whose body is already read: with retries when the route has a policy.
#[allow(clippy::manual_async_fn)] // one slot per argument, not two
pub fn send_buffered<'a>(
    call: &'a Call<'a>,
    policy: Option<&'a RetryPolicy>,
    deadline: tokio::time::Instant,
    head: Head,
    body: Bytes,
) -> impl Future<Output = Result<Response<UpstreamBody>, ProxyError>> {
    async move {
        match policy {
            Some(policy) => send_with_retries(call, policy, deadline, head, body).await,
            None => balance::send_once(call, head.into_request(body), false).await,
        }
    }
}

pub enum Replay {
    Ready(Head, Bytes),
    /// Too large, or of unknown length: sent once, as it streams.
    Once(Request<Incoming>),
}

/// The request with its body read, when the body is small enough to hold (64 KiB, by its
/// `Content-Length`); otherwise the request as it is, to stream.
pub async fn replayable(req: Request<Incoming>) -> Result<Replay, ProxyError> {
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

#[allow(clippy::manual_async_fn)] // one slot per argument, not two
fn send_with_retries<'a>(
    call: &'a Call<'a>,
    policy: &'a RetryPolicy,
    deadline: tokio::time::Instant,
    mut head: Head,
    body: Bytes,
) -> impl Future<Output = Result<Response<UpstreamBody>, ProxyError>> {
    async move {
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
            // The app may want to know it is seeing a retry (and log it). Set before the copy is
            // made, so that neither table grows for it.
            head.headers
                .insert(ATTEMPT_HEADER, attempt_value(number + 1));
            let req = head.take_request(body.clone());
            let try_ = Try {
                number: number + 1,
                waited,
                per_try_timeout: policy.per_try_timeout,
            };
            let result = balance::attempt(call, endpoint, req, false, try_).await;
            let outcome = match &result {
                Ok(resp) => Outcome::Response(resp.status(), resp.headers()),
                Err(e) => match e.retry_outcome() {
                    Some(outcome) => outcome,
                    None => return result,
                },
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
}
