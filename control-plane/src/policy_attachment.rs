//! What the mesh's policy resources share (GEP-713 policy attachment): the resource shape
//! (`metadata`, an untyped `spec`, `status`), `targetRefs` naming Services of the policy's
//! own namespace, the order that decides conflicts (oldest first), and the `status.ancestors`
//! each policy gets, written by the replica that holds the Lease.
//!
//! A spec is kept untyped until it is checked: one malformed policy is refused by itself,
//! with the field it got wrong, and never stops the watch that brings the others.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value};

/// Each policy, by `namespace/name`: applied, or why not (a GEP-713 reason and a message).
pub type PolicyOutcomes = BTreeMap<String, Result<(), (&'static str, String)>>;

/// A policy resource: a namespaced object with an untyped spec and a status.
pub trait PolicyResource:
    kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
{
    fn spec(&self) -> &Value;
    fn status(&self) -> Option<&Value>;
}

/// Declares a policy resource of `policy.outrigger.io/v1alpha1`.
#[macro_export]
macro_rules! policy_resource {
    ($type:ident, $kind:literal, $plural:literal) => {
        #[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize, PartialEq)]
        #[serde(rename_all = "camelCase")]
        pub struct $type {
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub api_version: Option<String>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub kind: Option<String>,
            pub metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
            #[serde(default)]
            pub spec: serde_json::Value,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub status: Option<serde_json::Value>,
        }

        $crate::namespaced_resource!(
            $type,
            $kind,
            $crate::policy_attachment::GROUP,
            "v1alpha1",
            $plural
        );

        impl $crate::policy_attachment::PolicyResource for $type {
            fn spec(&self) -> &serde_json::Value {
                &self.spec
            }
            fn status(&self) -> Option<&serde_json::Value> {
                self.status.as_ref()
            }
        }
    };
}

pub const GROUP: &str = "policy.outrigger.io";

/// The policies oldest first (then by namespace and name), each with its `namespace/name`.
pub fn ordered<P: PolicyResource>(policies: &[Arc<P>]) -> Vec<(String, &P)> {
    let mut ordered: Vec<&P> = policies.iter().map(Arc::as_ref).collect();
    ordered.sort_by_key(|p| {
        let m = p.meta();
        let created = m.creation_timestamp.as_ref().map(|t| t.0);
        (created, m.namespace.clone(), m.name.clone())
    });
    ordered.into_iter().map(|p| (key(p), p)).collect()
}

pub fn key<P: PolicyResource>(p: &P) -> String {
    let m = p.meta();
    format!(
        "{}/{}",
        m.namespace.as_deref().unwrap_or_default(),
        m.name.as_deref().unwrap_or_default()
    )
}

/// What a policy is attached to: its targeted Services, or, with none, its namespace.
fn ancestor_refs(spec: &Value, namespace: &str) -> Vec<Value> {
    use serde_json::json;
    match targets(spec) {
        Ok(names) => names
            .into_iter()
            .map(|name| json!({"group": "", "kind": "Service", "name": name, "namespace": namespace}))
            .collect(),
        Err(_) => vec![json!({"group": "", "kind": "Namespace", "name": namespace})],
    }
}

/// The spec's keys from camelCase to the mesh file's snake_case, all the way down, without
/// nulls: JSON is YAML, so the mesh file's reader then takes it with its own checks.
pub fn snake_keys(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                if !v.is_null() {
                    out.insert(snake(k), snake_keys(v));
                }
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(snake_keys).collect()),
        other => other.clone(),
    }
}

/// Writes each policy's `status.ancestors` (GEP-713): for each Service it targets, the
/// `Accepted` condition with this mesh's controller name, keeping other controllers' entries.
/// Written only when it changes, conditional on the policy's resourceVersion.
pub async fn write_status<P: PolicyResource>(
    client: &kube::Client,
    policies: &[Arc<P>],
    outcomes: &PolicyOutcomes,
    written: &mut crate::route_status::Written,
) {
    use serde_json::json;
    const CONTROLLER: &str = crate::route_status::CONTROLLER;
    written.retain(|key, _| outcomes.contains_key(key));
    for p in policies {
        let namespace = p.meta().namespace.as_deref().unwrap_or_default();
        let name = p.meta().name.as_deref().unwrap_or_default();
        let key = format!("{namespace}/{name}");
        let version = p.meta().resource_version.clone().unwrap_or_default();
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
            .status()
            .and_then(|s| s["ancestors"].as_array().cloned())
            .unwrap_or_default();
        let mine = |a: &&Value| a["controllerName"] == CONTROLLER;
        let before = current.iter().find(mine);
        let unchanged = before.is_some_and(|b| {
            let c = &b["conditions"][0];
            c["status"] == status
                && c["reason"] == reason
                && c["message"] == message.as_str()
                && c["observedGeneration"] == json!(p.meta().generation.unwrap_or_default())
        });
        let refs = ancestor_refs(p.spec(), namespace);
        if unchanged && current.iter().filter(mine).count() == refs.len() {
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
            "observedGeneration": p.meta().generation.unwrap_or_default(),
            "lastTransitionTime": since,
        });
        let ours = refs.into_iter().map(|ancestor| {
            json!({
                "ancestorRef": ancestor,
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
        crate::route_status::patch_status::<P>(
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
pub fn targets(spec: &Value) -> Result<Vec<String>, String> {
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

pub fn strip_nulls(map: &mut Map<String, Value>) {
    map.retain(|_, v| !v.is_null());
    for v in map.values_mut() {
        if let Value::Object(inner) = v {
            strip_nulls(inner);
        }
    }
}

/// `consecutiveGatewayFailure` → `consecutive_gateway_failure`; `consecutive5xx` →
/// `consecutive_5xx`.
pub fn snake(camel: &str) -> String {
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
