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

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::mesh::Service;
use crate::policy::{self, PolicyFile};

pub const GROUP: &str = "policy.outrigger.io";

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResiliencePolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Value>,
}

crate::namespaced_resource!(
    ResiliencePolicy,
    "ResiliencePolicy",
    GROUP,
    "v1alpha1",
    "resiliencepolicies"
);

/// Each policy, by `namespace/name`: applied, or why not (a GEP-713 reason and a message).
pub type PolicyOutcomes = BTreeMap<String, Result<(), (&'static str, String)>>;

/// Sets the policy of each Service that a policy in `policies` targets.
pub fn apply(services: &mut [Service], policies: &[Arc<ResiliencePolicy>]) -> PolicyOutcomes {
    let mut ordered: Vec<&ResiliencePolicy> = policies.iter().map(Arc::as_ref).collect();
    ordered.sort_by_key(|p| {
        let created = p.metadata.creation_timestamp.as_ref().map(|t| t.0);
        (
            created,
            p.metadata.namespace.clone(),
            p.metadata.name.clone(),
        )
    });
    let mut outcomes = PolicyOutcomes::new();
    // Which policy each Service (namespace, name) took.
    let mut taken: BTreeMap<(String, String), String> = BTreeMap::new();
    for p in ordered {
        let namespace = p.metadata.namespace.clone().unwrap_or_default();
        let key = format!(
            "{namespace}/{}",
            p.metadata.name.as_deref().unwrap_or_default()
        );
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

/// Writes each policy's `status.ancestors` (GEP-713): for each Service it targets, the
/// `Accepted` condition with this mesh's controller name, keeping other controllers' entries.
/// Written only when it changes, conditional on the policy's resourceVersion.
pub async fn write_status(
    client: &kube::Client,
    policies: &[Arc<ResiliencePolicy>],
    outcomes: &PolicyOutcomes,
    written: &mut crate::route_status::Written,
) {
    use serde_json::json;
    const CONTROLLER: &str = crate::route_status::CONTROLLER;
    written.retain(|key, _| outcomes.contains_key(key));
    for p in policies {
        let namespace = p.metadata.namespace.as_deref().unwrap_or_default();
        let name = p.metadata.name.as_deref().unwrap_or_default();
        let key = format!("{namespace}/{name}");
        let version = p.metadata.resource_version.clone().unwrap_or_default();
        let Some(outcome) = outcomes.get(&key) else {
            continue;
        };
        if written.get(&key) == Some(&version) {
            continue;
        }
        let (status, reason, message) = match outcome {
            Ok(()) => ("True", "Accepted", String::new()),
            Err((reason, message)) => ("False", *reason, message.clone()),
        };
        let current: Vec<Value> = p
            .status
            .as_ref()
            .and_then(|s| s["ancestors"].as_array().cloned())
            .unwrap_or_default();
        let mine = |a: &&Value| a["controllerName"] == CONTROLLER;
        let before = current.iter().find(mine);
        let unchanged = before.is_some_and(|b| {
            let c = &b["conditions"][0];
            c["status"] == status
                && c["reason"] == reason
                && c["message"] == message.as_str()
                && c["observedGeneration"] == json!(p.metadata.generation.unwrap_or_default())
        });
        if unchanged
            && current.iter().filter(mine).count() == targets(&p.spec).map_or(0, |t| t.len()).max(1)
        {
            continue;
        }
        let since = before
            .map(|b| &b["conditions"][0])
            .filter(|c| c["status"] == status)
            .map(|c| c["lastTransitionTime"].clone())
            .unwrap_or_else(|| {
                json!(
                    k8s_openapi::jiff::Timestamp::now()
                        .strftime("%Y-%m-%dT%H:%M:%SZ")
                        .to_string()
                )
            });
        let condition = json!({
            "type": "Accepted", "status": status, "reason": reason, "message": message,
            "observedGeneration": p.metadata.generation.unwrap_or_default(),
            "lastTransitionTime": since,
        });
        let ours = targets(&p.spec).unwrap_or_default().into_iter().map(|target| {
            json!({
                "ancestorRef": {"group": "", "kind": "Service", "name": target, "namespace": namespace},
                "controllerName": CONTROLLER,
                "conditions": [condition.clone()],
            })
        });
        let ancestors: Vec<Value> = current
            .iter()
            .filter(|a| !mine(a))
            .cloned()
            .chain(ours)
            .collect();
        let patch = json!({
            "metadata": {"resourceVersion": version},
            "status": {"ancestors": ancestors},
        });
        crate::route_status::patch_status::<ResiliencePolicy>(
            client,
            (namespace, name),
            patch,
            (key, version),
            written,
        )
        .await;
    }
}

/// The names of the Services in `spec.targetRefs`.
fn targets(spec: &Value) -> Result<Vec<String>, String> {
    let refs = spec["targetRefs"]
        .as_array()
        .filter(|r| !r.is_empty())
        .ok_or("spec.targetRefs: at least one Service is needed")?;
    refs.iter()
        .enumerate()
        .map(|(i, r)| {
            let group = r["group"].as_str().unwrap_or_default();
            if r["kind"] != "Service" || !matches!(group, "" | "core") {
                return Err(format!(
                    "spec.targetRefs[{i}]: only a Service (group \"\") may be targeted"
                ));
            }
            r["name"]
                .as_str()
                .filter(|n| !n.is_empty())
                .map(str::to_string)
                .ok_or(format!("spec.targetRefs[{i}].name is required"))
        })
        .collect()
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

fn strip_nulls(map: &mut Map<String, Value>) {
    map.retain(|_, v| !v.is_null());
    for v in map.values_mut() {
        if let Value::Object(inner) = v {
            strip_nulls(inner);
        }
    }
}

/// `consecutiveGatewayFailure` → `consecutive_gateway_failure`; `consecutive5xx` →
/// `consecutive_5xx`.
fn snake(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    let mut previous_digit = false;
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else if c.is_ascii_digit() && !previous_digit {
            out.push('_');
            out.push(c);
        } else {
            out.push(c);
        }
        previous_digit = c.is_ascii_digit();
    }
    out
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
