//! The timeout stage: a request gets its route's timeout, shortened by a gRPC client's own
//! deadline (past it, nobody is waiting for the answer), over all its tries and backoffs.

use std::future::Future;
use std::time::Duration;

use http::{HeaderMap, HeaderName};

use crate::net::alarm::{self, Within};
use crate::upstream::error::ProxyError;

/// A gRPC client's own deadline.
const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// The time a request may take, from its route and its `grpc-timeout`.
pub fn for_request(route_timeout: Duration, headers: &HeaderMap) -> Duration {
    grpc_timeout(headers).map_or(route_timeout, |t| t.min(route_timeout))
}

/// The inner stages, cut off at `deadline`. A plain future rather than another async layer:
/// the inner future is large, and each layer would move it once more per request. Its timer
/// is an `Alarm`, which the request's many wakes do not each poll in full.
pub fn within<F: Future>(deadline: tokio::time::Instant, inner: F) -> Within<F> {
    alarm::within(deadline, inner)
}

/// What the caller gets when the timeout passes: a 504.
pub fn expired(timeout: Duration) -> ProxyError {
    ProxyError::UpstreamTimeout { after: timeout }
}

/// `grpc-timeout`: an integer of up to 8 digits and a unit (gRPC over HTTP/2, "Timeout").
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(GRPC_TIMEOUT)?.to_str().ok()?;
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

    #[tokio::test(start_paused = true)]
    async fn the_inner_stages_are_cut_off_at_the_timeout() {
        let slow = async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok::<_, ProxyError>(())
        };
        let t = Duration::from_secs(1);
        let started = tokio::time::Instant::now();
        let err = within(started + t, slow)
            .await
            .map_err(|_| expired(t))
            .unwrap_err();
        assert!(matches!(err, ProxyError::UpstreamTimeout { after } if after == t));
        assert_eq!(started.elapsed(), t);
    }

    #[test]
    fn a_grpc_deadline_only_ever_shortens_the_route_timeout() {
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", "100m".parse().unwrap());
        assert_eq!(
            for_request(Duration::from_secs(15), &h),
            Duration::from_millis(100)
        );
        h.insert("grpc-timeout", "1H".parse().unwrap());
        assert_eq!(
            for_request(Duration::from_secs(15), &h),
            Duration::from_secs(15)
        );
    }
}
