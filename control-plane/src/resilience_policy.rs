//! `ResiliencePolicy` (`policy.outrigger.io/v1alpha1`): the resilience settings Gateway API
//! does not have, attached to a Service with `targetRefs` as GEP-713 describes: retries, a
//! retry budget, the circuit breaker, outlier detection and a rate limit.
//!
//! The spec says the same things as the mesh file's `policy:` section, in Kubernetes'
//! camelCase; it is checked by the same code, so both sources accept and refuse alike. The
//! spec is kept untyped until then: one malformed policy is refused by itself, with the field
//! it got wrong, and never stops the watch that brings the others.
//!
//! A Service targeted by several policies takes the oldest (then the first by name); the
//! others are refused as conflicting. A policy in one namespace cannot target another's
//! Service.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value};

pub use crate::policy_attachment::PolicyOutcomes;
use crate::policy_attachment::{ordered, snake, strip_nulls, targets};

use crate::mesh::Service;
use crate::policy::{self, PolicyFile};

crate::policy_resource!(ResiliencePolicy, "ResiliencePolicy", "resiliencepolicies");

/// Sets the policy of each Service that a policy in `policies` targets.
pub fn apply(services: &mut [Service], policies: &[Arc<ResiliencePolicy>]) -> PolicyOutcomes {
    let mut outcomes = PolicyOutcomes::new();
    // Which policy each Service (namespace, name) took.
    let mut taken: BTreeMap<(String, String), String> = BTreeMap::new();
    for (key, p) in ordered(policies) {
        let namespace = p.metadata.namespace.clone().unwrap_or_default();
        let invalid = |e: String| ("Invalid", e);
        let outcome = targets(&p.spec).map_err(invalid).and_then(|targets| {
            let checked = check(&key, &p.spec).map_err(invalid)?;
            let mut applied = 0;
            for target in targets {
                if let Some(other) = taken.get(&(namespace.clone(), target.clone())) {
                    return Err((
                        "Conflicted",
                        format!(
                            "Service {namespace}/{target} already takes ResiliencePolicy {other}"
                        ),
                    ));
                }
                for s in services
                    .iter_mut()
                    .filter(|s| s.namespace == namespace && s.name == target)
                {
                    s.policy = checked.clone();
                    applied += 1;
                }
                taken.insert((namespace.clone(), target), key.clone());
            }
            if applied == 0 {
                return Err(("TargetNotFound", "no targeted Service exists".into()));
            }
            Ok(())
        });
        outcomes.insert(key, outcome);
    }
    outcomes
}

/// The spec, checked as the mesh file's `policy:` section would be.
fn check(source: &str, spec: &Value) -> Result<policy::Policy, String> {
    let mut file = Map::new();
    for (key, value) in spec.as_object().into_iter().flatten() {
        match key.as_str() {
            "targetRefs" => {}
            "retry" | "outlier" | "circuitBreaker" | "rateLimit" => {
                let merged = file
                    .entry(snake(key))
                    .or_insert_with(|| Value::Object(Map::new()));
                for (k, v) in value.as_object().into_iter().flatten() {
                    merged[snake(k)] = v.clone();
                }
                if !value.is_object() {
                    return Err(format!("spec.{key} must be an object"));
                }
            }
            // The mesh file keeps the budget with the circuit breaker, as Envoy does.
            "retryBudget" => {
                let breaker = file
                    .entry("circuit_breaker".to_string())
                    .or_insert_with(|| Value::Object(Map::new()));
                breaker["retry_budget_percent"] = value["percent"].clone();
                breaker["retry_budget_min_retries"] = value["minRetries"].clone();
                if let Some(extra) = value.as_object().and_then(|o| {
                    o.keys()
                        .find(|k| !matches!(k.as_str(), "percent" | "minRetries"))
                }) {
                    return Err(format!("spec.retryBudget.{extra} is not a field"));
                }
            }
            other => return Err(format!("spec.{other} is not a field")),
        }
    }
    strip_nulls(&mut file);
    // JSON is YAML: the mesh file's reader takes it, with its own checks and messages.
    let text = Value::Object(file).to_string();
    let parsed: PolicyFile = serde_saphyr::from_str(&text).map_err(|e| format!("spec: {e}"))?;
    policy::check(source, &parsed, "spec").map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn field_names_become_the_mesh_files() {
        assert_eq!(
            snake("consecutiveGatewayFailure"),
            "consecutive_gateway_failure"
        );
        assert_eq!(snake("consecutive5xx"), "consecutive_5xx");
        assert_eq!(snake("maxEjectionPercent"), "max_ejection_percent");
        assert_eq!(snake("requestsPerSecond"), "requests_per_second");
    }

    #[test]
    fn a_policy_is_checked_as_the_mesh_file_is() {
        let good = json!({
            "targetRefs": [{"group": "", "kind": "Service", "name": "catalog"}],
            "retry": {"attempts": 3, "perTryTimeout": "500ms"},
            "retryBudget": {"percent": 25, "minRetries": 5},
            "outlier": {"consecutive5xx": 3, "baseEjection": "10s"},
            "rateLimit": {"requestsPerSecond": 50},
        });
        let p = check("shop/catalog", &good).unwrap();
        assert_eq!(p.retry.unwrap().retries, 3);
        assert_eq!(p.outlier.unwrap().consecutive_5xx, Some(3));
        let budget = p.circuit_breaker.unwrap().retry_budget.unwrap();
        assert_eq!((budget.percent, budget.min_retries), (25.0, 5));
        assert_eq!(p.rate_limit.unwrap().requests_per_second, 50.0);

        let typo = json!({"targetRefs": [], "retry": {"atempts": 3}});
        assert!(
            check("x", &typo).unwrap_err().contains("atempts"),
            "{:?}",
            check("x", &typo)
        );
        let bad = json!({"retry": {"attempts": 1, "perTryTimeout": "soon"}});
        assert!(check("x", &bad).unwrap_err().contains("per_try_timeout"));
        assert!(
            check("x", &json!({"timeouts": {}}))
                .unwrap_err()
                .contains("spec.timeouts")
        );
        assert!(targets(&json!({"targetRefs": [{"kind": "Namespace", "name": "shop"}]})).is_err());
    }
}
