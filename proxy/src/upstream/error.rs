//! What can go wrong with a proxied request, and the one place where that becomes a response.
//!
//! Every synthetic response carries `x-outrigger-error` with a stable reason code and a body
//! that starts with `outrigger:`, so nobody mistakes the proxy's answer for the app's.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::policy::retry::Outcome;
use crate::upstream::client::Body;

pub const ERROR_HEADER: HeaderName = HeaderName::from_static("x-outrigger-error");
/// Set on a fast failure from a circuit-breaker threshold, so a client can tell "the mesh
/// shed load" from "the service is down".
pub const OVERLOADED_HEADER: HeaderName = HeaderName::from_static("x-outrigger-overloaded");

/// Which side of the proxy a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Downstream,
    Upstream,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("no virtual host for host `{host}`")]
    NoVirtualHost { host: String },
    #[error("no route for host `{host}` path `{path}`")]
    NoRoute { host: String, path: String },
    #[error("no endpoint in cluster `{cluster}`")]
    NoEndpoint { cluster: String },
    #[error("cannot connect to cluster `{cluster}`: {reason}")]
    UpstreamConnect { cluster: String, reason: String },
    #[error("cluster `{cluster}` is over its {limit} limit")]
    Overloaded {
        cluster: String,
        limit: &'static str,
    },
    #[error("upstream did not answer within {after:?}")]
    UpstreamTimeout { after: Duration },
    #[error("upstream failed: {reason}")]
    UpstreamFailed {
        reason: String,
        /// HTTP/2 REFUSED_STREAM: the upstream did not process the request.
        refused: bool,
    },
    #[error("caller {peer} may not use this service")]
    Denied { peer: String },
    #[error("{scope} is over its rate limit")]
    RateLimited {
        scope: String,
        retry_after: Duration,
    },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::NoVirtualHost { .. } | ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::NoEndpoint { .. }
            | ProxyError::UpstreamConnect { .. }
            | ProxyError::Overloaded { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UpstreamFailed { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Denied { .. } => StatusCode::FORBIDDEN,
        }
    }

    /// A stable, machine-readable reason for the header and for metrics.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) => "bad-request",
            ProxyError::NoVirtualHost { .. } | ProxyError::NoRoute { .. } => "no-route",
            ProxyError::NoEndpoint { .. } => "no-endpoint",
            ProxyError::UpstreamConnect { .. } => "connect-failed",
            ProxyError::Overloaded { .. } => "overloaded",
            ProxyError::UpstreamTimeout { .. } => "timeout",
            ProxyError::UpstreamFailed { .. } => "upstream-failed",
            ProxyError::RateLimited { .. } => "rate-limited",
            ProxyError::Denied { .. } => "denied",
        }
    }

    pub fn side(&self) -> Side {
        match self {
            ProxyError::BadRequest(_) => Side::Downstream,
            ProxyError::NoVirtualHost { .. }
            | ProxyError::NoRoute { .. }
            | ProxyError::NoEndpoint { .. }
            | ProxyError::Overloaded { .. }
            | ProxyError::RateLimited { .. }
            | ProxyError::Denied { .. } => Side::Internal,
            ProxyError::UpstreamConnect { .. }
            | ProxyError::UpstreamTimeout { .. }
            | ProxyError::UpstreamFailed { .. } => Side::Upstream,
        }
    }

    /// What this failure is to a retry policy, if it may be retried at all: the request never
    /// reached the app (a failed connect, a refused stream), or the upstream failed or went
    /// quiet mid-way. A failure on our side or the caller's is never retried.
    pub fn retry_outcome(&self) -> Option<Outcome<'static>> {
        match self {
            ProxyError::UpstreamConnect { .. } => Some(Outcome::ConnectFailed),
            ProxyError::UpstreamTimeout { .. } => Some(Outcome::TimedOut),
            ProxyError::UpstreamFailed { refused: true, .. } => Some(Outcome::Refused),
            ProxyError::UpstreamFailed { .. } => Some(Outcome::Reset),
            _ => None,
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let body = format!("outrigger: {}\n", self);
        let mut resp = Response::new(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        );
        *resp.status_mut() = self.status();
        let headers = resp.headers_mut();
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.code()));
        match &self {
            ProxyError::Overloaded { .. } => {
                headers.insert(OVERLOADED_HEADER, HeaderValue::from_static("true"));
            }
            ProxyError::RateLimited { retry_after, .. } => {
                // Retry-After counts whole seconds; rounding down would invite an early retry.
                let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                headers.insert(http::header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
            }
            _ => {}
        }
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_failed_upstream_may_be_retried() {
        let upstream = [
            ProxyError::UpstreamConnect {
                cluster: "c".into(),
                reason: "refused".into(),
            },
            ProxyError::UpstreamTimeout {
                after: Duration::from_secs(1),
            },
            ProxyError::UpstreamFailed {
                reason: "reset".into(),
                refused: false,
            },
        ];
        for e in upstream {
            assert_eq!(e.side(), Side::Upstream);
            assert!(e.retry_outcome().is_some(), "{e}");
        }
        let ours = [
            ProxyError::BadRequest("x"),
            ProxyError::NoEndpoint {
                cluster: "c".into(),
            },
            ProxyError::Denied { peer: "p".into() },
        ];
        for e in ours {
            assert_ne!(e.side(), Side::Upstream);
            assert!(e.retry_outcome().is_none(), "{e}");
        }
    }
}
