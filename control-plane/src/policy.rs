//! Resilience policies in the mesh file, and their Envoy v3 form: `retry_policy` with
//! `retry_back_off` and a per-route `local_ratelimit` on routes, `circuit_breakers` (with a
//! retry budget) and `outlier_detection` on clusters.
//!
//! Only what a user writes is sent: no policy is invented by default here, because a proxy
//! that cannot honour a field NACKs it, and a default would then block every update.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, OutlierDetection, circuit_breakers,
};
use envoy_types::pb::envoy::config::core::v3::RoutingPriority;
use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
use envoy_types::pb::envoy::config::route::v3::{FilterConfig, RetryPolicy, retry_policy};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::r#type::v3::{
    FractionalPercent, Percent, TokenBucket, fractional_percent,
};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, UInt32Value};
use outrigger_proxy::config_error::ConfigError;
use outrigger_proxy::runtime_config::parse_duration;
use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::translate::pack;

/// Envoy's retry conditions, HTTP and gRPC.
const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "refused-stream",
    "retriable-4xx",
    "retriable-status-codes",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default)]
    pub retry: Option<RetryFile>,
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreakerFile>,
    #[serde(default)]
    pub outlier: Option<OutlierFile>,
    /// A token bucket on every route to the service, kept by each calling proxy.
    #[serde(default)]
    pub rate_limit: Option<RateLimitFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitFile {
    pub requests_per_second: u32,
    /// Defaults to one second's worth.
    #[serde(default)]
    pub burst: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub requests_per_second: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryFile {
    /// Retries after the first attempt.
    pub attempts: u32,
    #[serde(default)]
    pub on: Vec<Spanned<String>>,
    #[serde(default)]
    pub per_try_timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub backoff_base: Option<Spanned<String>>,
    #[serde(default)]
    pub backoff_max: Option<Spanned<String>>,
    /// Responses with these statuses are retried too.
    #[serde(default)]
    pub status_codes: Vec<u16>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerFile {
    #[serde(default)]
    pub max_connections: Option<u32>,
    #[serde(default)]
    pub max_pending: Option<u32>,
    #[serde(default)]
    pub max_requests: Option<u32>,
    #[serde(default)]
    pub max_retries: Option<u32>,
    /// Retries may be at most this share of active requests (percent).
    #[serde(default)]
    pub retry_budget_percent: Option<f64>,
    #[serde(default)]
    pub retry_budget_min_retries: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierFile {
    /// `false` turns outlier detection off here; it is on by default.
    #[serde(default)]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub consecutive_5xx: Option<u32>,
    #[serde(default)]
    pub consecutive_gateway_failure: Option<u32>,
    #[serde(default)]
    pub interval: Option<Spanned<String>>,
    #[serde(default)]
    pub base_ejection: Option<Spanned<String>>,
    #[serde(default)]
    pub max_ejection: Option<Spanned<String>>,
    #[serde(default)]
    pub max_ejection_percent: Option<u32>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Retry {
    pub retries: u32,
    pub on: Vec<String>,
    pub per_try_timeout: Option<Duration>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub status_codes: Vec<u16>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policy {
    pub retry: Option<Retry>,
    pub circuit_breaker: Option<CircuitBreaker>,
    pub outlier: Option<Outlier>,
    pub rate_limit: Option<RateLimit>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CircuitBreaker {
    pub max_connections: Option<u32>,
    pub max_pending: Option<u32>,
    pub max_requests: Option<u32>,
    pub max_retries: Option<u32>,
    pub retry_budget_percent: Option<f64>,
    pub retry_budget_min_retries: Option<u32>,
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

fn duration(
    source: &str,
    value: &Option<Spanned<String>>,
    field: &str,
) -> Result<Option<Duration>, ConfigError> {
    match value {
        None => Ok(None),
        Some(v) => parse_duration(&v.value).map(Some).ok_or_else(|| {
            ConfigError::at(
                source,
                Some(v.referenced),
                field,
                format!("`{}` is not a duration (try `250ms`, `2s`)", v.value),
            )
        }),
    }
}

pub fn check_retry(source: &str, r: &RetryFile, field: &str) -> Result<Retry, ConfigError> {
    let mut on = Vec::new();
    for (i, cond) in r.on.iter().enumerate() {
        if !RETRY_ON.contains(&cond.value.as_str()) {
            return Err(ConfigError::at(
                source,
                Some(cond.referenced),
                &format!("{field}.on[{i}]"),
                format!(
                    "`{}` is not a retry condition; one of {}",
                    cond.value,
                    RETRY_ON.join(", ")
                ),
            ));
        }
        on.push(cond.value.clone());
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
        status_codes: r.status_codes.clone(),
        on,
        per_try_timeout: duration(
            source,
            &r.per_try_timeout,
            &format!("{field}.per_try_timeout"),
        )?,
        backoff_base: duration(source, &r.backoff_base, &format!("{field}.backoff_base"))?
            .unwrap_or(Duration::from_millis(25)),
        backoff_max: duration(source, &r.backoff_max, &format!("{field}.backoff_max"))?
            .unwrap_or(Duration::from_millis(250)),
    })
}

/// The conditions under which a retry is safe whatever the app does: the request never
/// reached it, or it said it could not take it.
pub const DEFAULT_RETRY_ON: [&str; 5] = [
    "connect-failure",
    "refused-stream",
    "reset",
    "gateway-error",
    "unavailable",
];

/// What applies where a service or route says nothing, before the mesh file's `defaults:`:
/// 2 retries on the conditions that are safe whatever the app does, and ejection after 5
/// consecutive 5xx or gateway failures. Sent explicitly in xDS, so Envoy and gRPC clients get
/// the same protection as our proxy.
pub fn builtin_defaults() -> Policy {
    Policy {
        retry: Some(Retry {
            retries: 2,
            on: DEFAULT_RETRY_ON.map(String::from).to_vec(),
            per_try_timeout: None,
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            status_codes: Vec::new(),
        }),
        outlier: Some(Outlier {
            enabled: true,
            consecutive_5xx: Some(5),
            consecutive_gateway_failure: Some(5),
            interval: None,
            base_ejection: None,
            max_ejection: None,
            max_ejection_percent: None,
        }),
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

pub fn check(source: &str, p: &PolicyFile, field: &str) -> Result<Policy, ConfigError> {
    let retry = match &p.retry {
        Some(r) => Some(check_retry(source, r, &format!("{field}.retry"))?),
        None => None,
    };
    let circuit_breaker = p.circuit_breaker.as_ref().map(|c| CircuitBreaker {
        max_connections: c.max_connections,
        max_pending: c.max_pending,
        max_requests: c.max_requests,
        max_retries: c.max_retries,
        retry_budget_percent: c.retry_budget_percent,
        retry_budget_min_retries: c.retry_budget_min_retries,
    });
    if let Some(pct) = circuit_breaker
        .as_ref()
        .and_then(|c| c.retry_budget_percent)
        && !(0.0..=100.0).contains(&pct)
    {
        return Err(ConfigError::at(
            source,
            None,
            &format!("{field}.circuit_breaker.retry_budget_percent"),
            "must be 0 to 100",
        ));
    }
    let outlier = match &p.outlier {
        Some(o) => {
            if o.max_ejection_percent.is_some_and(|p| p > 100) {
                return Err(ConfigError::at(
                    source,
                    None,
                    &format!("{field}.outlier.max_ejection_percent"),
                    "must be 0 to 100",
                ));
            }
            Some(Outlier {
                enabled: o.enabled != Some(false),
                consecutive_5xx: o.consecutive_5xx,
                consecutive_gateway_failure: o.consecutive_gateway_failure,
                interval: duration(source, &o.interval, &format!("{field}.outlier.interval"))?,
                base_ejection: duration(
                    source,
                    &o.base_ejection,
                    &format!("{field}.outlier.base_ejection"),
                )?,
                max_ejection: duration(
                    source,
                    &o.max_ejection,
                    &format!("{field}.outlier.max_ejection"),
                )?,
                max_ejection_percent: o.max_ejection_percent,
            })
        }
        None => None,
    };
    Ok(Policy {
        retry,
        circuit_breaker,
        outlier,
        rate_limit: match &p.rate_limit {
            Some(r) => Some(check_rate_limit(source, r, &format!("{field}.rate_limit"))?),
            None => None,
        },
    })
}

pub fn check_rate_limit(
    source: &str,
    r: &RateLimitFile,
    field: &str,
) -> Result<RateLimit, ConfigError> {
    if r.requests_per_second == 0 {
        return Err(ConfigError::at(
            source,
            None,
            &format!("{field}.requests_per_second"),
            "must be above 0",
        ));
    }
    Ok(RateLimit {
        requests_per_second: r.requests_per_second,
        burst: r.burst.unwrap_or(r.requests_per_second).max(1),
    })
}

/// The HTTP filter's name, in the listener's filter chain and in each route's config.
pub const LOCAL_RATE_LIMIT_FILTER: &str = "envoy.filters.http.local_ratelimit";

/// Envoy's local rate limit as a route's per-filter config. It is marked optional, so that a
/// client without the filter (a gRPC library, say) skips it instead of refusing the route.
pub fn local_rate_limit(r: &RateLimit) -> Any {
    let all = || RuntimeFractionalPercent {
        default_value: Some(FractionalPercent {
            numerator: 100,
            denominator: fractional_percent::DenominatorType::Hundred as i32,
        }),
        runtime_key: String::new(),
    };
    let limit = LocalRateLimit {
        stat_prefix: "local_rate_limit".into(),
        token_bucket: Some(TokenBucket {
            max_tokens: r.burst,
            tokens_per_fill: Some(UInt32Value {
                value: r.requests_per_second,
            }),
            fill_interval: Some(pb(Duration::from_secs(1))),
        }),
        filter_enabled: Some(all()),
        filter_enforced: Some(all()),
        enable_retry_after_header: true,
        ..Default::default()
    };
    pack(&FilterConfig {
        config: Some(pack(&limit)),
        is_optional: true,
        ..Default::default()
    })
}

fn pb(d: Duration) -> PbDuration {
    PbDuration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

fn u32v(v: Option<u32>) -> Option<UInt32Value> {
    v.map(|value| UInt32Value { value })
}

pub fn retry_policy(r: &Retry) -> RetryPolicy {
    let mut on = r.on.clone();
    if !r.status_codes.is_empty() && !on.iter().any(|c| c == "retriable-status-codes") {
        on.push("retriable-status-codes".into());
    }
    RetryPolicy {
        retry_on: on.join(","),
        retriable_status_codes: r.status_codes.iter().map(|&c| u32::from(c)).collect(),
        num_retries: Some(UInt32Value { value: r.retries }),
        per_try_timeout: r.per_try_timeout.map(pb),
        retry_back_off: Some(retry_policy::RetryBackOff {
            base_interval: Some(pb(r.backoff_base)),
            max_interval: Some(pb(r.backoff_max)),
        }),
        ..Default::default()
    }
}

pub fn circuit_breakers(c: &CircuitBreaker) -> CircuitBreakers {
    let budget =
        (c.retry_budget_percent.is_some() || c.retry_budget_min_retries.is_some()).then(|| {
            circuit_breakers::thresholds::RetryBudget {
                budget_percent: c.retry_budget_percent.map(|value| Percent { value }),
                min_retry_concurrency: u32v(c.retry_budget_min_retries),
                ..Default::default()
            }
        });
    CircuitBreakers {
        thresholds: vec![circuit_breakers::Thresholds {
            priority: RoutingPriority::Default as i32,
            max_connections: u32v(c.max_connections),
            max_pending_requests: u32v(c.max_pending),
            max_requests: u32v(c.max_requests),
            max_retries: u32v(c.max_retries),
            retry_budget: budget,
            ..Default::default()
        }],
        ..Default::default()
    }
}

pub fn outlier_detection(o: &Outlier) -> OutlierDetection {
    if !o.enabled {
        let off = Some(UInt32Value { value: 0 });
        return OutlierDetection {
            enforcing_consecutive_5xx: off,
            enforcing_consecutive_gateway_failure: off,
            enforcing_success_rate: off,
            enforcing_failure_percentage: off,
            ..Default::default()
        };
    }
    OutlierDetection {
        consecutive_5xx: u32v(o.consecutive_5xx),
        consecutive_gateway_failure: u32v(o.consecutive_gateway_failure),
        // Envoy counts gateway failures but does not act on them unless told to.
        enforcing_consecutive_gateway_failure: o
            .consecutive_gateway_failure
            .map(|_| UInt32Value { value: 100 }),
        interval: o.interval.map(pb),
        base_ejection_time: o.base_ejection.map(pb),
        max_ejection_time: o.max_ejection.map(pb),
        max_ejection_percent: u32v(o.max_ejection_percent),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use crate::mesh::Mesh;
    use crate::translate::{CLUSTER_TYPE, ROUTE_TYPE, translate};
    use envoy_types::pb::envoy::config::cluster::v3::Cluster;
    use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, route};
    use prost::Message;

    /// A name and a number, if the resource has one.
    type Named = Vec<(String, Option<u32>)>;

    /// The outbound route table's retry counts, and each cluster's 5xx enforcement.
    fn resilience(yaml: &str) -> (Named, Named) {
        let mesh = Mesh::parse("mesh.yaml", yaml).unwrap();
        let [clusters, _, _, routes] = translate(&mesh);
        assert_eq!((clusters.0, routes.0), (CLUSTER_TYPE, ROUTE_TYPE));
        let table = RouteConfiguration::decode(&routes.1.by_name["outbound"].value[..]).unwrap();
        let retries = table
            .virtual_hosts
            .iter()
            .flat_map(|vh| &vh.routes)
            .map(|r| {
                let Some(route::Action::Route(a)) = &r.action else {
                    unreachable!()
                };
                let n = a
                    .retry_policy
                    .as_ref()
                    .and_then(|p| p.num_retries)
                    .map(|n| n.value);
                (r.name.clone(), n)
            })
            .collect();
        let outliers = clusters
            .1
            .by_name
            .iter()
            .map(|(name, any)| {
                let c = Cluster::decode(&any.value[..]).unwrap();
                let enforced = c.outlier_detection.as_ref().map(|o| {
                    o.enforcing_consecutive_5xx.map_or(100, |e| e.value)
                        * o.consecutive_5xx.map_or(5, |v| v.value).min(1)
                });
                (name.clone(), enforced)
            })
            .collect();
        (retries, outliers)
    }

    #[test]
    fn without_a_word_every_route_retries_and_every_cluster_ejects() {
        let (retries, outliers) =
            resilience("services:\n  - name: a\n    routes:\n      - match: {prefix: /x}\n");
        assert!(retries.iter().all(|(_, n)| *n == Some(2)), "{retries:?}");
        assert_eq!(outliers, vec![("a.default".into(), Some(100))]);
    }

    #[test]
    fn the_mesh_defaults_and_a_service_can_turn_them_off() {
        let (retries, outliers) = resilience(
            "defaults:\n  retry: {attempts: 1}\nservices:\n  - name: a\n  - name: b\n    policy:\n      retry: {attempts: 0}\n      outlier: {enabled: false}\n",
        );
        assert_eq!(
            retries,
            vec![("a/default".into(), Some(1)), ("b/default".into(), Some(0))]
        );
        assert_eq!(
            outliers,
            vec![
                ("a.default".into(), Some(100)),
                ("b.default".into(), Some(0))
            ],
            "off is sent as nothing enforced"
        );
    }
}
