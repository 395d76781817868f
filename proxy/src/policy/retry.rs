//! Retries: which outcomes may be retried and how long to wait before the next try. Whether
//! the cluster can afford another one is `retry_budget`'s call.

use std::time::Duration;

use http::{HeaderMap, HeaderName, Method, StatusCode};
use outrigger_core::backoff::Backoff;

/// gRPC's status, read from a trailers-only response's headers (or from trailers). Names are
/// constants, not text: a name given as text is parsed at every lookup.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Bodies up to this size are kept for replay; a larger request is sent once.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a retry condition")]
pub struct UnknownCondition(pub String);

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RetryOn {
    pub connect_failure: bool,
    pub refused_stream: bool,
    pub reset: bool,
    /// Any 5xx.
    pub server_error: bool,
    /// 502, 503, 504.
    pub gateway_error: bool,
    /// gRPC UNAVAILABLE (14), from headers or a trailers-only response.
    pub grpc_unavailable: bool,
    pub grpc_cancelled: bool,
    pub grpc_deadline_exceeded: bool,
    pub grpc_resource_exhausted: bool,
    /// Envoy's `retriable_status_codes`.
    pub status_codes: Vec<u16>,
}

impl RetryOn {
    /// Parses Envoy's `retry_on` names; returns the first it does not know.
    pub fn parse<'a>(
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<RetryOn, UnknownCondition> {
        let mut on = RetryOn::default();
        for name in names {
            match name.trim() {
                "connect-failure" => on.connect_failure = true,
                "refused-stream" => on.refused_stream = true,
                "reset" => on.reset = true,
                "5xx" => on.server_error = true,
                "gateway-error" => on.gateway_error = true,
                "unavailable" => on.grpc_unavailable = true,
                "cancelled" => on.grpc_cancelled = true,
                "deadline-exceeded" => on.grpc_deadline_exceeded = true,
                "resource-exhausted" => on.grpc_resource_exhausted = true,
                // The codes themselves come in their own list.
                "retriable-status-codes" => {}
                other => return Err(UnknownCondition(other.to_string())),
            }
        }
        Ok(on)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub retries: u32,
    pub on: RetryOn,
    pub per_try_timeout: Option<Duration>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Retry POST, PATCH and other non-idempotent methods too.
    pub non_idempotent: bool,
}

impl RetryPolicy {
    /// The data path's form of a checked policy. The condition names were checked against
    /// the list every proxy honours, which is exactly what `RetryOn::parse` knows.
    pub fn from_model(r: &outrigger_core::policy::Retry) -> RetryPolicy {
        let mut on = RetryOn::parse(r.on.iter().map(String::as_str))
            .expect("retry conditions are checked against the model's list");
        on.status_codes = r.status_codes.clone();
        RetryPolicy {
            retries: r.retries,
            on,
            per_try_timeout: r.per_try_timeout,
            backoff_base: r.backoff_base,
            backoff_max: r.backoff_max,
            non_idempotent: r.non_idempotent,
        }
    }

    /// Full jitter: a uniform wait in [0, min(max, base × 2^attempt)]. Spreading retries out
    /// keeps a fleet of clients from hitting a recovering backend in lockstep.
    pub fn backoff(&self, attempt: u32) -> Duration {
        Backoff::new(self.backoff_base, self.backoff_max).full_jitter(attempt)
    }

    /// Whether a request may be sent again after this outcome. A request that never left
    /// (the connection failed) or was refused unprocessed may always be. Otherwise the method must be idempotent, or the
    /// policy must opt in; gRPC calls are all POST, and their policy opts in by naming the
    /// gRPC statuses to retry on, as gRPC's own retry policy does.
    pub fn allows(&self, method: &Method, headers: &HeaderMap, outcome: &Outcome<'_>) -> bool {
        let grpc = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        matches!(outcome, Outcome::ConnectFailed | Outcome::Refused)
            || self.non_idempotent
            || method.is_idempotent()
            || grpc
    }
}

/// How long the upstream asked us to wait, from `Retry-After` in delta-seconds. (The
/// HTTP-date form is not read: a clock-skewed date is worse than none, and servers that shed
/// load send seconds.)
/// The longest wait an upstream's `Retry-After` can ask for: past it, the value is taken as
/// this. Any route timeout is shorter, so the answer then goes back at once.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds: u64 = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER))
}

/// What one attempt came to, as far as retrying is concerned.
pub enum Outcome<'a> {
    ConnectFailed,
    /// HTTP/2 REFUSED_STREAM: not processed.
    Refused,
    Reset,
    /// The per-try timeout passed.
    TimedOut,
    Response(StatusCode, &'a HeaderMap),
}

pub fn retriable(on: &RetryOn, outcome: &Outcome<'_>) -> bool {
    match outcome {
        Outcome::ConnectFailed => on.connect_failure,
        Outcome::Refused => on.refused_stream || on.reset,
        Outcome::Reset => on.reset,
        // As Envoy: a per-try timeout counts as a gateway error.
        Outcome::TimedOut => on.gateway_error || on.server_error,
        Outcome::Response(status, headers) => {
            let code = status.as_u16();
            if (on.server_error && status.is_server_error())
                || (on.gateway_error && matches!(code, 502..=504))
                || on.status_codes.contains(&code)
            {
                return true;
            }
            // A gRPC failure before any message comes as a trailers-only response: the
            // status is in the headers.
            match headers
                .get(GRPC_STATUS)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u8>().ok())
            {
                Some(14) => on.grpc_unavailable,
                Some(1) => on.grpc_cancelled,
                Some(4) => on.grpc_deadline_exceeded,
                Some(8) => on.grpc_resource_exhausted,
                _ => false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            retries: 3,
            on: RetryOn::parse(["connect-failure", "gateway-error", "unavailable"]).unwrap(),
            per_try_timeout: None,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            non_idempotent: false,
        }
    }

    #[test]
    fn backoff_stays_within_full_jitter_bounds() {
        let p = policy();
        for attempt in 0..10 {
            let cap = Duration::from_millis(25 * (1 << attempt)).min(Duration::from_millis(250));
            for _ in 0..200 {
                assert!(p.backoff(attempt) <= cap, "attempt {attempt}");
            }
        }
        // Full jitter really spreads: some waits are short, some near the cap.
        let waits: Vec<Duration> = (0..500).map(|_| p.backoff(4)).collect();
        assert!(waits.iter().any(|w| *w < Duration::from_millis(50)));
        assert!(waits.iter().any(|w| *w > Duration::from_millis(200)));
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_sleeps_on_the_paused_clock() {
        let p = policy();
        let started = tokio::time::Instant::now();
        let mut total = Duration::ZERO;
        for attempt in 0..3 {
            let wait = p.backoff(attempt);
            total += wait;
            tokio::time::sleep(wait).await;
        }
        // The timer wheel rounds each sleep up to a whole millisecond.
        let elapsed = started.elapsed();
        assert!(
            elapsed >= total && elapsed <= total + Duration::from_millis(3),
            "{elapsed:?} vs {total:?}"
        );
        assert!(total <= Duration::from_millis(25 + 50 + 100));
    }

    #[test]
    fn conditions() {
        let on = policy().on;
        let empty = HeaderMap::new();
        assert!(retriable(&on, &Outcome::ConnectFailed));
        assert!(!retriable(&on, &Outcome::Reset));
        assert!(retriable(
            &on,
            &Outcome::Response(StatusCode::SERVICE_UNAVAILABLE, &empty)
        ));
        assert!(!retriable(
            &on,
            &Outcome::Response(StatusCode::INTERNAL_SERVER_ERROR, &empty)
        ));
        let mut grpc = HeaderMap::new();
        grpc.insert("grpc-status", "14".parse().unwrap());
        assert!(retriable(&on, &Outcome::Response(StatusCode::OK, &grpc)));
        grpc.insert("grpc-status", "5".parse().unwrap());
        assert!(!retriable(&on, &Outcome::Response(StatusCode::OK, &grpc)));
        let all = RetryOn::parse([
            "unavailable",
            "cancelled",
            "deadline-exceeded",
            "resource-exhausted",
        ])
        .unwrap();
        for code in ["14", "1", "4", "8"] {
            grpc.insert("grpc-status", code.parse().unwrap());
            let outcome = Outcome::Response(StatusCode::OK, &grpc);
            assert!(retriable(&all, &outcome), "grpc-status {code}");
            assert!(
                code == "14" || !retriable(&on, &outcome),
                "grpc-status {code} only when named"
            );
        }
        assert!(!retriable(&all, &Outcome::Refused));
        let refused = RetryOn::parse(["refused-stream"]).unwrap();
        assert!(retriable(&refused, &Outcome::Refused));
        assert!(
            !retriable(&refused, &Outcome::Reset),
            "a plain reset is not a refusal"
        );
        assert_eq!(
            RetryOn::parse(["sometimes"]),
            Err(UnknownCondition("sometimes".into()))
        );
        let mut with_codes = on.clone();
        with_codes.status_codes = vec![429];
        let too_many = Outcome::Response(StatusCode::TOO_MANY_REQUESTS, &empty);
        assert!(!retriable(&on, &too_many));
        assert!(retriable(&with_codes, &too_many));
    }

    #[test]
    fn retry_after_in_seconds() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "3".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "18446744073709551615".parse().unwrap());
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn only_idempotent_methods_unless_opted_in() {
        let mut p = policy();
        let (plain, empty) = (HeaderMap::new(), HeaderMap::new());
        let failed = Outcome::Response(StatusCode::SERVICE_UNAVAILABLE, &empty);
        assert!(p.allows(&Method::GET, &plain, &failed) && p.allows(&Method::PUT, &plain, &failed));
        assert!(!p.allows(&Method::POST, &plain, &failed));
        assert!(
            p.allows(&Method::POST, &plain, &Outcome::ConnectFailed),
            "it never left"
        );
        let mut grpc = HeaderMap::new();
        grpc.insert("content-type", "application/grpc+proto".parse().unwrap());
        assert!(p.allows(&Method::POST, &grpc, &failed));
        p.non_idempotent = true;
        assert!(p.allows(&Method::POST, &plain, &failed));
    }
}
