//! The resilience policy model, written once for the proxy's config file, the mesh file and
//! xDS: retries, circuit breaking with a retry budget, outlier detection and rate limits.
//!
//! `*File` types are the YAML a user writes; the others are checked values. The defaults a
//! route or cluster gets when it says nothing are the constants and `builtin_defaults` here,
//! and nowhere else.

use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::config_error::ConfigError;
use crate::duration::field_duration;

/// Retries after the first attempt where nothing says otherwise.
pub const DEFAULT_RETRIES: u32 = 2;

/// The conditions under which a retry is safe whatever the app does: the request never
/// reached it, or it said it could not take it.
pub const DEFAULT_RETRY_ON: [&str; 5] = [
    "connect-failure",
    "refused-stream",
    "reset",
    "gateway-error",
    "unavailable",
];

/// Every retry condition a proxy in the mesh honours, by Envoy's `retry_on` names.
pub const RETRY_CONDITIONS: [&str; 10] = [
    "connect-failure",
    "refused-stream",
    "reset",
    "5xx",
    "gateway-error",
    "retriable-status-codes",
    "unavailable",
    "cancelled",
    "deadline-exceeded",
    "resource-exhausted",
];

pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(250);

/// Ejection after this many consecutive 5xx, or gateway failures (502, 503, 504, resets).
pub const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
pub const DEFAULT_CONSECUTIVE_GATEWAY_FAILURE: u32 = 5;
pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 50;

/// Retries may be at most this share (percent) of requests…
pub const DEFAULT_BUDGET_PERCENT: f64 = 20.0;
/// …plus this many per second; and this many in flight are always allowed.
pub const DEFAULT_BUDGET_MIN_RETRIES: u32 = 10;

/// Requests in flight to one cluster.
pub const DEFAULT_MAX_REQUESTS: u32 = 1024;
/// HTTP/1.1 connections to one cluster.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;
/// Requests waiting for one of those connections.
pub const DEFAULT_MAX_PENDING: u32 = 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryFile {
    /// Retries after the first attempt; 0 turns retries off.
    pub attempts: u32,
    /// Envoy's `retry_on` names; default: `DEFAULT_RETRY_ON`.
    #[serde(default)]
    pub on: Vec<Spanned<String>>,
    #[serde(default)]
    pub per_try_timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub backoff_base: Option<Spanned<String>>,
    #[serde(default)]
    pub backoff_max: Option<Spanned<String>>,
    /// Retry non-idempotent methods (POST, PATCH) too.
    #[serde(default)]
    pub non_idempotent: bool,
    /// Responses with these statuses are retried too (429, say).
    #[serde(default)]
    pub status_codes: Vec<u16>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitFile {
    pub requests_per_second: f64,
    /// Defaults to one second's worth, and at least one request.
    #[serde(default)]
    pub burst: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OutlierFile {
    /// `false` turns outlier detection off here; it is on by default.
    #[serde(default)]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub consecutive_5xx: Option<u32>,
    #[serde(default)]
    pub consecutive_gateway_failure: Option<u32>,
    /// How often Envoy sweeps for ejections; our proxy acts on each response instead.
    #[serde(default)]
    pub interval: Option<Spanned<String>>,
    #[serde(default)]
    pub base_ejection: Option<Spanned<String>>,
    #[serde(default)]
    pub max_ejection: Option<Spanned<String>>,
    #[serde(default)]
    pub max_ejection_percent: Option<u32>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerFile {
    /// HTTP/1.1 connections to the cluster.
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// Requests waiting for one of those connections.
    #[serde(default)]
    pub max_pending: Option<u32>,
    /// Requests in flight to the cluster.
    #[serde(default)]
    pub max_requests: Option<u32>,
    /// Retries in flight; unlimited by default (the retry budget applies either way).
    #[serde(default)]
    pub max_retries: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBudgetFile {
    /// Retries may be at most this share (percent) of requests, over the last second and
    /// in flight.
    pub percent: f64,
    /// …plus this many per second; and this many in flight are always allowed.
    pub min_retries: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    pub retries: u32,
    pub on: Vec<String>,
    pub per_try_timeout: Option<Duration>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub non_idempotent: bool,
    pub status_codes: Vec<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub requests_per_second: f64,
    pub burst: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    pub percent: f64,
    pub min_retries: u32,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct CircuitBreaker {
    pub max_connections: Option<u32>,
    pub max_pending: Option<u32>,
    pub max_requests: Option<u32>,
    pub max_retries: Option<u32>,
    pub retry_budget: Option<RetryBudget>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Outlier {
    /// False: turned off, and sent as such (nothing enforced), so no client's own default
    /// turns it back on.
    pub enabled: bool,
    pub consecutive_5xx: Option<u32>,
    pub consecutive_gateway_failure: Option<u32>,
    pub interval: Option<Duration>,
    pub base_ejection: Option<Duration>,
    pub max_ejection: Option<Duration>,
    pub max_ejection_percent: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policy {
    pub retry: Option<Retry>,
    pub circuit_breaker: Option<CircuitBreaker>,
    pub outlier: Option<Outlier>,
    pub rate_limit: Option<RateLimit>,
}

/// What a route gets when it says nothing about retries.
pub fn default_retry() -> Retry {
    Retry {
        retries: DEFAULT_RETRIES,
        on: DEFAULT_RETRY_ON.map(String::from).to_vec(),
        per_try_timeout: None,
        backoff_base: DEFAULT_BACKOFF_BASE,
        backoff_max: DEFAULT_BACKOFF_MAX,
        non_idempotent: false,
        status_codes: Vec::new(),
    }
}

/// What a cluster gets when it says nothing about outlier detection.
pub fn default_outlier() -> Outlier {
    Outlier {
        enabled: true,
        consecutive_5xx: Some(DEFAULT_CONSECUTIVE_5XX),
        consecutive_gateway_failure: Some(DEFAULT_CONSECUTIVE_GATEWAY_FAILURE),
        interval: None,
        base_ejection: None,
        max_ejection: None,
        max_ejection_percent: None,
    }
}

/// What applies where a service or route says nothing: retries on the conditions that are
/// safe whatever the app does, and ejection of an endpoint that keeps failing. The control
/// plane sends these explicitly in xDS, so Envoy and gRPC clients get the same protection as
/// our proxy.
pub fn builtin_defaults() -> Policy {
    Policy {
        retry: Some(default_retry()),
        outlier: Some(default_outlier()),
        circuit_breaker: None,
        rate_limit: None,
    }
}

impl Policy {
    /// This policy, with `defaults` where it says nothing.
    pub fn or(&self, defaults: &Policy) -> Policy {
        Policy {
            retry: self.retry.clone().or_else(|| defaults.retry.clone()),
            circuit_breaker: self
                .circuit_breaker
                .clone()
                .or_else(|| defaults.circuit_breaker.clone()),
            outlier: self.outlier.clone().or_else(|| defaults.outlier.clone()),
            rate_limit: self.rate_limit.or(defaults.rate_limit),
        }
    }
}

pub fn check_retry(source: &str, r: &RetryFile, field: &str) -> Result<Retry, ConfigError> {
    let mut on = Vec::with_capacity(r.on.len());
    for (i, cond) in r.on.iter().enumerate() {
        if !RETRY_CONDITIONS.contains(&cond.value.trim()) {
            return Err(ConfigError::at(
                source,
                Some(cond.referenced),
                &format!("{field}.on[{i}]"),
                format!(
                    "`{}` is not a retry condition; one of {}",
                    cond.value,
                    RETRY_CONDITIONS.join(", ")
                ),
            ));
        }
        on.push(cond.value.trim().to_string());
    }
    if on.is_empty() {
        on = DEFAULT_RETRY_ON.map(String::from).to_vec();
    }
    if let Some((i, code)) = r
        .status_codes
        .iter()
        .enumerate()
        .find(|(_, c)| !(100..=599).contains(*c))
    {
        return Err(ConfigError::at(
            source,
            None,
            &format!("{field}.status_codes[{i}]"),
            format!("{code} is not an HTTP status"),
        ));
    }
    Ok(Retry {
        retries: r.attempts,
        on,
        per_try_timeout: field_duration(
            source,
            &r.per_try_timeout,
            &format!("{field}.per_try_timeout"),
        )?,
        backoff_base: field_duration(source, &r.backoff_base, &format!("{field}.backoff_base"))?
            .unwrap_or(DEFAULT_BACKOFF_BASE),
        backoff_max: field_duration(source, &r.backoff_max, &format!("{field}.backoff_max"))?
            .unwrap_or(DEFAULT_BACKOFF_MAX),
        non_idempotent: r.non_idempotent,
        status_codes: r.status_codes.clone(),
    })
}

pub fn check_rate_limit(
    source: &str,
    r: &RateLimitFile,
    field: &str,
) -> Result<RateLimit, ConfigError> {
    let rate = r.requests_per_second;
    if !(rate.is_finite() && rate > 0.0) {
        return Err(ConfigError::at(
            source,
            None,
            &format!("{field}.requests_per_second"),
            "must be a number above 0",
        ));
    }
    Ok(RateLimit {
        requests_per_second: rate,
        burst: r.burst.unwrap_or(rate.ceil() as u32).max(1),
    })
}

pub fn check_retry_budget(
    source: &str,
    b: Option<&RetryBudgetFile>,
    field: &str,
) -> Result<RetryBudget, ConfigError> {
    let budget = b.map_or(
        RetryBudget {
            percent: DEFAULT_BUDGET_PERCENT,
            min_retries: DEFAULT_BUDGET_MIN_RETRIES,
        },
        |b| RetryBudget {
            percent: b.percent,
            min_retries: b.min_retries,
        },
    );
    if !(0.0..=100.0).contains(&budget.percent) {
        return Err(ConfigError::at(
            source,
            None,
            &format!("{field}.percent"),
            "must be 0 to 100",
        ));
    }
    Ok(budget)
}

pub fn check_circuit_breaker(
    c: &CircuitBreakerFile,
    budget: Option<RetryBudget>,
) -> CircuitBreaker {
    CircuitBreaker {
        max_connections: c.max_connections,
        max_pending: c.max_pending,
        max_requests: c.max_requests,
        max_retries: c.max_retries,
        retry_budget: budget,
    }
}

/// `None` when the file turns detection off.
pub fn check_outlier(source: &str, o: &OutlierFile, field: &str) -> Result<Outlier, ConfigError> {
    if o.max_ejection_percent.is_some_and(|p| p > 100) {
        return Err(ConfigError::at(
            source,
            None,
            &format!("{field}.max_ejection_percent"),
            "must be 0 to 100",
        ));
    }
    Ok(Outlier {
        enabled: o.enabled != Some(false),
        consecutive_5xx: o.consecutive_5xx,
        consecutive_gateway_failure: o.consecutive_gateway_failure,
        interval: field_duration(source, &o.interval, &format!("{field}.interval"))?,
        base_ejection: field_duration(source, &o.base_ejection, &format!("{field}.base_ejection"))?,
        max_ejection: field_duration(source, &o.max_ejection, &format!("{field}.max_ejection"))?,
        max_ejection_percent: o.max_ejection_percent,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_that_says_nothing_retries_twice_on_the_safe_conditions() {
        let r = default_retry();
        assert_eq!(r.retries, 2);
        assert!(!r.non_idempotent);
        assert!(
            DEFAULT_RETRY_ON
                .iter()
                .all(|c| RETRY_CONDITIONS.contains(c))
        );
    }

    #[test]
    fn a_condition_no_proxy_honours_is_refused_by_name() {
        let file: RetryFile =
            serde_saphyr::from_str("attempts: 1\non: [reset, internal]\n").unwrap();
        let e = check_retry("m.yaml", &file, "retry").unwrap_err();
        assert_eq!(e.field, "retry.on[1]");
    }
}
