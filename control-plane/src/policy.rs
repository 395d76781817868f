//! The mesh file's `policy:` and `defaults:` sections, checked into the shared policy model
//! (`outrigger_core::policy`), whose Envoy form `outrigger_core::xds_policy` writes.
//!
//! A service without a policy gets the mesh's `defaults:`, and where those say nothing, the
//! model's built-in defaults; both are sent explicitly, so every client gets the same.

use outrigger_core::config_error::ConfigError;
use outrigger_core::policy as model;
use serde::Deserialize;

pub use outrigger_core::policy::{
    OutlierFile, Policy, RateLimit, RateLimitFile, Retry, RetryFile, builtin_defaults,
    check_rate_limit,
};
pub use outrigger_core::xds_policy::{
    LOCAL_RATE_LIMIT_FILTER, circuit_breakers, local_rate_limit, outlier_detection, retry_policy,
};

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

/// The mesh file keeps the retry budget beside the other limits, as Envoy's
/// `circuit_breakers` does.
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

/// A route's or service's retry policy. Whether a non-idempotent request may be retried is
/// not expressible in Envoy's retry policy, so the mesh file refuses to promise it.
pub fn check_retry(source: &str, r: &RetryFile, field: &str) -> Result<Retry, ConfigError> {
    if r.non_idempotent {
        return Err(ConfigError::at(
            source,
            None,
            &format!("{field}.non_idempotent"),
            "cannot be sent over xDS; set it in a proxy's own config file",
        ));
    }
    model::check_retry(source, r, field)
}

pub fn check(source: &str, p: &PolicyFile, field: &str) -> Result<Policy, ConfigError> {
    let retry = match &p.retry {
        Some(r) => Some(check_retry(source, r, &format!("{field}.retry"))?),
        None => None,
    };
    let circuit_breaker = match &p.circuit_breaker {
        None => None,
        Some(c) => {
            let budget = (c.retry_budget_percent.is_some() || c.retry_budget_min_retries.is_some())
                .then(|| {
                    model::check_retry_budget(
                        source,
                        Some(&model::RetryBudgetFile {
                            percent: c
                                .retry_budget_percent
                                .unwrap_or(model::DEFAULT_BUDGET_PERCENT),
                            min_retries: c
                                .retry_budget_min_retries
                                .unwrap_or(model::DEFAULT_BUDGET_MIN_RETRIES),
                        }),
                        &format!("{field}.circuit_breaker.retry_budget"),
                    )
                })
                .transpose()
                .map_err(|mut e: ConfigError| {
                    e.field = format!("{field}.circuit_breaker.retry_budget_percent");
                    e
                })?;
            Some(model::check_circuit_breaker(
                &model::CircuitBreakerFile {
                    max_connections: c.max_connections,
                    max_pending: c.max_pending,
                    max_requests: c.max_requests,
                    max_retries: c.max_retries,
                },
                budget,
            ))
        }
    };
    let outlier = match &p.outlier {
        Some(o) => Some(model::check_outlier(
            source,
            o,
            &format!("{field}.outlier"),
        )?),
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
