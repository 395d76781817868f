//! Kubernetes objects in tests: YAML documents as JSON trees, checked against the typed API
//! objects of k8s-openapi.

use serde_json::Value;

/// The documents of a YAML stream, read as Kubernetes reads them (YAML 1.2 scalars).
pub fn yaml_documents(text: &str) -> Vec<Value> {
    let options = serde_saphyr::options! {
        strict_booleans: true,
        leading_zero_numbers_as_strings: true,
        underscored_numbers_as_strings: true,
    };
    let docs: Vec<Value> = serde_saphyr::from_multiple_with_options(text, options).unwrap();
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(obj: &Value) {
    let typed: T = serde_json::from_value(obj.clone())
        .unwrap_or_else(|e| panic!("not a valid {}: {e}\n{obj:#}", std::any::type_name::<T>()));
    // Every field must survive the typed object: an unknown or mistyped one would not.
    let mut back = serde_json::to_value(&typed).unwrap();
    drop_added_type_meta(&mut back, obj);
    let (mut back, mut obj) = (back, obj.clone());
    drop_empty(&mut back);
    drop_empty(&mut obj);
    assert_eq!(back, obj, "fields lost in {}", std::any::type_name::<T>());
}

/// `null` and `{}` say nothing, and the typed objects leave them out. A number is compared
/// by value: a schema's `minimum: 1` comes back as `1.0`.
fn drop_empty(v: &mut Value) {
    match v {
        Value::Number(n) => {
            if let Some(f) = n.as_f64().and_then(serde_json::Number::from_f64) {
                *n = f;
            }
        }
        Value::Object(map) => {
            map.values_mut().for_each(drop_empty);
            map.retain(|_, c| !c.is_null() && c.as_object().is_none_or(|o| !o.is_empty()));
        }
        Value::Array(items) => items.iter_mut().for_each(drop_empty),
        _ => {}
    }
}

/// Typed objects embedded in others (a StatefulSet's claim templates) serialize their own
/// `apiVersion` and `kind`, which the manifest may leave out.
fn drop_added_type_meta(back: &mut Value, orig: &Value) {
    match (back, orig) {
        (Value::Object(b), Value::Object(o)) => {
            for key in ["apiVersion", "kind"] {
                if !o.contains_key(key) {
                    b.shift_remove(key);
                }
            }
            for (k, child) in b.iter_mut() {
                if let Some(oc) = o.get(k) {
                    drop_added_type_meta(child, oc);
                }
            }
        }
        (Value::Array(b), Value::Array(o)) => {
            for (bc, oc) in b.iter_mut().zip(o) {
                drop_added_type_meta(bc, oc);
            }
        }
        _ => {}
    }
}

/// Parses `obj` as the typed object its `kind` names and checks nothing is lost on the way.
pub fn assert_typed(obj: &Value) {
    use k8s_openapi::api::{admissionregistration::v1 as admission, rbac::v1 as rbac};
    use k8s_openapi::api::{apps::v1 as apps, batch::v1 as batch, core::v1 as core};
    match obj["kind"].as_str().unwrap_or_default() {
        "Deployment" => round_trip::<apps::Deployment>(obj),
        "StatefulSet" => round_trip::<apps::StatefulSet>(obj),
        "DaemonSet" => round_trip::<apps::DaemonSet>(obj),
        "ReplicaSet" => round_trip::<apps::ReplicaSet>(obj),
        "Job" => round_trip::<batch::Job>(obj),
        "CronJob" => round_trip::<batch::CronJob>(obj),
        "Pod" => round_trip::<core::Pod>(obj),
        "Service" => round_trip::<core::Service>(obj),
        "EndpointSlice" => round_trip::<k8s_openapi::api::discovery::v1::EndpointSlice>(obj),
        "ConfigMap" => round_trip::<core::ConfigMap>(obj),
        "Secret" => round_trip::<core::Secret>(obj),
        "Namespace" => round_trip::<core::Namespace>(obj),
        "HTTPRoute" => round_trip::<outrigger_control_plane::gateway_api::HttpRoute>(obj),
        "GRPCRoute" => round_trip::<outrigger_control_plane::gateway_api::GrpcRoute>(obj),
        "ReferenceGrant" => {
            round_trip::<outrigger_control_plane::gateway_api::ReferenceGrant>(obj)
        }
        "ResiliencePolicy" => {
            round_trip::<outrigger_control_plane::resilience_policy::ResiliencePolicy>(obj)
        }
        "AuthorizationPolicy" => {
            round_trip::<outrigger_control_plane::inbound_policy::AuthorizationPolicy>(obj)
        }
        "MTLSPolicy" => round_trip::<outrigger_control_plane::inbound_policy::MtlsPolicy>(obj),
        "CustomResourceDefinition" => round_trip::<
            k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
        >(obj),
        "PodDisruptionBudget" => {
            round_trip::<k8s_openapi::api::policy::v1::PodDisruptionBudget>(obj)
        }
        "ServiceAccount" => round_trip::<core::ServiceAccount>(obj),
        "ClusterRole" => round_trip::<rbac::ClusterRole>(obj),
        "Role" => round_trip::<rbac::Role>(obj),
        "RoleBinding" => round_trip::<rbac::RoleBinding>(obj),
        "ClusterRoleBinding" => round_trip::<rbac::ClusterRoleBinding>(obj),
        "MutatingWebhookConfiguration" => {
            round_trip::<admission::MutatingWebhookConfiguration>(obj)
        }
        "List" => {
            for item in obj["items"].as_array().unwrap() {
                assert_typed(item);
            }
        }
        other => panic!("no typed object for kind `{other}`"),
    }
}

/// `obj` without what `inject` adds: the two containers, the two volumes, the annotation,
/// and any list or map that only they filled.
pub fn remove_injected(obj: &Value) -> Value {
    let mut obj = obj.clone();
    strip(&mut obj);
    obj
}

fn strip(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (_, child) in map.iter_mut() {
                strip(child);
            }
            if let Some(a) = map.get_mut("annotations").and_then(Value::as_object_mut) {
                a.shift_remove("outrigger.io/injected");
                a.shift_remove("outrigger.io/ca-root");
                if a.is_empty() {
                    map.shift_remove("annotations");
                }
            }
            for key in ["containers", "initContainers", "volumes"] {
                if let Some(list) = map.get_mut(key).and_then(Value::as_array_mut) {
                    list.retain(|c| {
                        !c["name"]
                            .as_str()
                            .is_some_and(|n| n.starts_with("outrigger-"))
                    });
                    if list.is_empty() && key != "containers" {
                        map.shift_remove(key);
                    }
                }
            }
            if map
                .get("metadata")
                .is_some_and(|m| m.as_object().is_some_and(|m| m.is_empty()))
            {
                map.shift_remove("metadata");
            }
        }
        Value::Array(items) => items.iter_mut().for_each(strip),
        _ => {}
    }
}
