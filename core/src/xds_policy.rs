//! The policy model in Envoy v3 form, both ways: a route's `retry_policy` with
//! `retry_back_off` and its per-route `local_ratelimit`, a cluster's `circuit_breakers` (with
//! the retry budget) and `outlier_detection`.
//!
//! The control plane writes them; a proxy reads them back into the same file model a YAML
//! file gives, so xDS passes the same validation. A field the proxy cannot honour is refused
//! by name, never ignored.

use std::collections::HashMap;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, OutlierDetection, circuit_breakers,
};
use envoy_types::pb::envoy::config::core::v3::{RoutingPriority, RuntimeFractionalPercent};
use envoy_types::pb::envoy::config::route::v3::{FilterConfig, RetryPolicy, retry_policy};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::r#type::v3::fractional_percent::DenominatorType;
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, Percent, TokenBucket};
use envoy_types::pb::google::protobuf::{Any, Duration as PbDuration, UInt32Value};
use prost::Name;

use crate::policy::{
    CircuitBreaker, CircuitBreakerFile, DEFAULT_BUDGET_MIN_RETRIES, DEFAULT_BUDGET_PERCENT,
    DEFAULT_CONSECUTIVE_5XX, DEFAULT_CONSECUTIVE_GATEWAY_FAILURE, Outlier, OutlierFile,
    RETRY_CONDITIONS, RateLimit, RateLimitFile, Retry, RetryBudgetFile, RetryFile,
};
use crate::xds::{
    XdsError, decode, duration_text, pack, pb_duration as pb, refuse, sp, u32_value as u32v,
};

/// The HTTP filter's name, in the listener's filter chain and in each route's config.
pub const LOCAL_RATE_LIMIT_FILTER: &str = "envoy.filters.http.local_ratelimit";

/// Envoy's local rate limit as a route's per-filter config. It is marked optional, so that a
/// client without the filter (a gRPC library, say) skips it instead of refusing the route.
pub fn local_rate_limit(r: &RateLimit) -> Any {
    let all = || RuntimeFractionalPercent {
        default_value: Some(FractionalPercent {
            numerator: 100,
            denominator: DenominatorType::Hundred as i32,
        }),
        runtime_key: String::new(),
    };
    let limit = LocalRateLimit {
        stat_prefix: "local_rate_limit".into(),
        token_bucket: Some(token_bucket(r)),
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

/// Whole rates refill once a second; a fractional one (0.5/s) adds one token per interval.
fn token_bucket(r: &RateLimit) -> TokenBucket {
    let rate = r.requests_per_second;
    let (per_fill, interval) = if rate >= 1.0 && rate.fract() == 0.0 && rate <= f64::from(u32::MAX)
    {
        (rate as u32, Duration::from_secs(1))
    } else {
        (1, Duration::from_secs_f64(1.0 / rate))
    };
    TokenBucket {
        max_tokens: r.burst,
        tokens_per_fill: Some(UInt32Value { value: per_fill }),
        fill_interval: Some(pb(interval)),
    }
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
    let budget = c
        .retry_budget
        .map(|b| circuit_breakers::thresholds::RetryBudget {
            budget_percent: Some(Percent { value: b.percent }),
            min_retry_concurrency: Some(UInt32Value {
                value: b.min_retries,
            }),
            ..Default::default()
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

/// The circuit-breaker thresholds of the default priority; the high-priority set has no
/// meaning here, since the proxy routes every request at one priority.
pub fn thresholds(
    what: &str,
    cb: &CircuitBreakers,
) -> Result<(Option<RetryBudgetFile>, Option<CircuitBreakerFile>), XdsError> {
    let (mut budget, mut limits) = (None, None);
    for t in &cb.thresholds {
        refuse(
            what,
            &[(t.priority != 0, "circuit_breakers.thresholds.priority")],
        )?;
        if t.max_requests.is_some()
            || t.max_retries.is_some()
            || t.max_connections.is_some()
            || t.max_pending_requests.is_some()
        {
            limits = Some(CircuitBreakerFile {
                max_requests: t.max_requests.as_ref().map(|v| v.value),
                max_retries: t.max_retries.as_ref().map(|v| v.value),
                max_connections: t.max_connections.as_ref().map(|v| v.value),
                max_pending: t.max_pending_requests.as_ref().map(|v| v.value),
            });
        }
        if let Some(b) = &t.retry_budget {
            budget = Some(RetryBudgetFile {
                percent: b
                    .budget_percent
                    .as_ref()
                    .map_or(DEFAULT_BUDGET_PERCENT, |p| p.value),
                min_retries: b
                    .min_retry_concurrency
                    .as_ref()
                    .map_or(DEFAULT_BUDGET_MIN_RETRIES, |m| m.value),
            });
        }
    }
    Ok((budget, limits))
}

pub fn retry(what: &str, p: &RetryPolicy) -> Result<RetryFile, XdsError> {
    refuse(
        what,
        &[
            (
                p.retry_priority.is_some(),
                "route.retry_policy.retry_priority",
            ),
            (
                !p.retry_host_predicate.is_empty(),
                "route.retry_policy.retry_host_predicate",
            ),
            (
                !p.retriable_headers.is_empty(),
                "route.retry_policy.retriable_headers",
            ),
            (
                !p.retriable_request_headers.is_empty(),
                "route.retry_policy.retriable_request_headers",
            ),
            (
                p.rate_limited_retry_back_off.is_some(),
                "route.retry_policy.rate_limited_retry_back_off",
            ),
            (
                p.per_try_idle_timeout.is_some(),
                "route.retry_policy.per_try_idle_timeout",
            ),
        ],
    )?;
    let on: Vec<_> = p
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| sp(s.to_string()))
        .collect();
    if let Some(name) = on
        .iter()
        .find(|s| !RETRY_CONDITIONS.contains(&s.value.as_str()))
    {
        return Err(format!(
            "{what}: field `route.retry_policy.retry_on`: `{}` is not supported",
            name.value
        )
        .into());
    }
    let back_off = p.retry_back_off.as_ref();
    if let Some(code) = p
        .retriable_status_codes
        .iter()
        .find(|c| !(100..=599).contains(*c))
    {
        return Err(format!(
            "{what}: field `route.retry_policy.retriable_status_codes`: {code} is not an HTTP status"
        ).into());
    }
    // As in Envoy, the list means nothing unless `retry_on` asks for it.
    let status_codes = if on.iter().any(|s| s.value == "retriable-status-codes") {
        p.retriable_status_codes.iter().map(|&c| c as u16).collect()
    } else {
        Vec::new()
    };
    Ok(RetryFile {
        // Envoy's default is one retry when num_retries is unset.
        attempts: p.num_retries.as_ref().map_or(1, |n| n.value),
        on,
        per_try_timeout: p.per_try_timeout.as_ref().map(|d| sp(duration_text(d))),
        backoff_base: back_off
            .and_then(|b| b.base_interval.as_ref())
            .map(|d| sp(duration_text(d))),
        backoff_max: back_off
            .and_then(|b| b.max_interval.as_ref())
            .map(|d| sp(duration_text(d))),
        non_idempotent: false,
        status_codes,
    })
}

/// Consecutive-failure ejection is implemented; success-rate and failure-percentage
/// detection are not, so enforcing them is refused.
pub fn outlier(what: &str, o: &OutlierDetection) -> Result<OutlierFile, XdsError> {
    let enforced =
        |v: &Option<UInt32Value>, default: u32| v.as_ref().map_or(default, |v| v.value) > 0;
    refuse(
        what,
        &[
            (
                enforced(&o.enforcing_success_rate, 100) && o.success_rate_minimum_hosts.is_some(),
                "outlier_detection.success_rate",
            ),
            (
                enforced(&o.enforcing_failure_percentage, 0),
                "outlier_detection.enforcing_failure_percentage",
            ),
            (
                o.split_external_local_origin_errors,
                "outlier_detection.split_external_local_origin_errors",
            ),
        ],
    )?;
    let text = |d: &Option<PbDuration>| d.as_ref().map(|d| sp(duration_text(d)));
    // Envoy enforces consecutive 5xx unless told not to, and gateway failures only if told to.
    let consecutive_5xx = enforced(&o.enforcing_consecutive_5xx, 100).then(|| {
        o.consecutive_5xx
            .as_ref()
            .map_or(DEFAULT_CONSECUTIVE_5XX, |v| v.value)
    });
    let consecutive_gateway_failure =
        enforced(&o.enforcing_consecutive_gateway_failure, 0).then(|| {
            o.consecutive_gateway_failure
                .as_ref()
                .map_or(DEFAULT_CONSECUTIVE_GATEWAY_FAILURE, |v| v.value)
        });
    Ok(OutlierFile {
        // Nothing enforced is detection turned off, not the default.
        enabled: Some(consecutive_5xx.is_some() || consecutive_gateway_failure.is_some()),
        consecutive_5xx,
        consecutive_gateway_failure,
        interval: text(&o.interval),
        base_ejection: text(&o.base_ejection_time),
        max_ejection: text(&o.max_ejection_time),
        max_ejection_percent: o.max_ejection_percent.as_ref().map(|v| v.value),
    })
}

/// A route's `typed_per_filter_config` may carry Envoy's local rate limit, bare or in a
/// `FilterConfig` wrapper; any other filter's config is refused unless marked optional.
/// Envoy applies it only where `filter_enabled` and `filter_enforced` say so, and both default
/// to 0 %: unset means no limit, and anything but 0 % or 100 % is refused.
pub fn route_filters(
    what: &str,
    filters: &HashMap<String, Any>,
) -> Result<Option<RateLimitFile>, XdsError> {
    let mut limit = None;
    for (name, any) in filters {
        let field = format!("typed_per_filter_config.{name}");
        let (any, optional) = if any.type_url == FilterConfig::type_url() {
            let wrapper: FilterConfig =
                decode(any).map_err(|e| format!("{what}: field `{field}`: {e}"))?;
            if wrapper.disabled {
                continue;
            }
            let inner = wrapper
                .config
                .ok_or_else(|| format!("{what}: field `{field}.config` is required"))?;
            (inner, wrapper.is_optional)
        } else {
            (any.clone(), false)
        };
        if any.type_url != LocalRateLimit::type_url() {
            if optional {
                continue;
            }
            return Err(format!(
                "{what}: field `{field}`: {} is not supported by this proxy",
                any.type_url
            )
            .into());
        }
        let rl: LocalRateLimit =
            decode(&any).map_err(|e| format!("{what}: field `{field}`: {e}"))?;
        refuse(
            what,
            &[
                (!rl.descriptors.is_empty(), "local_ratelimit.descriptors"),
                (!rl.rate_limits.is_empty(), "local_ratelimit.rate_limits"),
                (
                    rl.local_rate_limit_per_downstream_connection,
                    "local_ratelimit.local_rate_limit_per_downstream_connection",
                ),
                (
                    rl.local_cluster_rate_limit.is_some(),
                    "local_ratelimit.local_cluster_rate_limit",
                ),
                (
                    rl.status.is_some_and(|s| s.code != 429),
                    "local_ratelimit.status",
                ),
            ],
        )?;
        let share = |p: &Option<RuntimeFractionalPercent>, f: &str| -> Result<bool, XdsError> {
            let Some(fp) = p.as_ref().and_then(|p| p.default_value) else {
                return Ok(false);
            };
            let whole = match DenominatorType::try_from(fp.denominator) {
                Ok(DenominatorType::Hundred) => 100,
                Ok(DenominatorType::TenThousand) => 10_000,
                Ok(DenominatorType::Million) => 1_000_000,
                Err(_) => return Err(format!("{what}: field `{f}`: unknown denominator").into()),
            };
            match fp.numerator {
                0 => Ok(false),
                n if n >= whole => Ok(true),
                _ => Err(format!(
                    "{what}: field `{f}`: only 0 % or 100 % is supported by this proxy"
                )
                .into()),
            }
        };
        let on = share(&rl.filter_enabled, "local_ratelimit.filter_enabled")?
            && share(&rl.filter_enforced, "local_ratelimit.filter_enforced")?;
        let Some(bucket) = rl.token_bucket.filter(|_| on) else {
            continue;
        };
        let per_fill = bucket.tokens_per_fill.map_or(1, |t| t.value);
        let interval = bucket
            .fill_interval
            .map_or(0.0, |d| d.seconds as f64 + f64::from(d.nanos) / 1e9);
        if interval <= 0.0 || per_fill == 0 {
            return Err(format!(
                "{what}: field `local_ratelimit.token_bucket`: fill_interval and tokens_per_fill must be above 0"
            ).into());
        }
        limit = Some(RateLimitFile {
            requests_per_second: f64::from(per_fill) / interval,
            burst: Some(bucket.max_tokens),
        });
    }
    Ok(limit)
}
