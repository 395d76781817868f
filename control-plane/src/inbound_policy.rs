//! The cluster's say on a Service's inbound side, attached with `targetRefs` (GEP-713):
//!
//! - `AuthorizationPolicy`: who may call the Service, on which paths and methods. Its spec
//!   is the mesh file's `authorization:` section in camelCase, checked by the same code.
//!   Several policies on one Service add up: a request any of them allows is let in.
//! - `MTLSPolicy`: strict or permissive mTLS, for the Services it targets or, without
//!   `targetRefs`, for every Service of its namespace. A Service's own policy wins over its
//!   namespace's; of two at the same level the oldest wins, and the other is `Conflicted`.
//!   Below both, a Namespace's `outrigger.io/inbound-tls` annotation sets the mode of its
//!   Services, as the same annotation on a pod sets its sidecar's.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::Value;

use crate::authorization::{self, AuthorizationFile};
use crate::mesh::{Service, TlsMode};
use crate::policy_attachment::{PolicyOutcomes, ordered, snake_keys, targets};

crate::policy_resource!(
    AuthorizationPolicy,
    "AuthorizationPolicy",
    "authorizationpolicies"
);
crate::policy_resource!(MtlsPolicy, "MTLSPolicy", "mtlspolicies");

/// Adds each AuthorizationPolicy's rules to the Services it targets.
pub fn apply_authorization(
    services: &mut [Service],
    policies: &[Arc<AuthorizationPolicy>],
    trust_domain: &str,
) -> PolicyOutcomes {
    let mut outcomes = PolicyOutcomes::new();
    for (key, p) in ordered(policies) {
        let namespace = p.metadata.namespace.clone().unwrap_or_default();
        let outcome = targets(&p.spec)
            .and_then(|targets| {
                let file = check_fields(&p.spec, &["targetRefs", "allow"])
                    .and_then(|()| parse::<AuthorizationFile>(&p.spec, "allow"))?;
                let rules = authorization::check(
                    &file,
                    &namespace,
                    trust_domain,
                    "spec",
                    &format!("{key}/"),
                )?;
                Ok((targets, rules))
            })
            .map_err(|e| ("Invalid", e))
            .and_then(|(targets, rules)| {
                let mut applied = 0;
                for s in services
                    .iter_mut()
                    .filter(|s| s.namespace == namespace && targets.contains(&s.name))
                {
                    s.authorization
                        .get_or_insert_with(Default::default)
                        .rules
                        .extend(rules.rules.iter().cloned());
                    applied += 1;
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

/// Sets each Service's mTLS mode from the MTLSPolicies that target it or its namespace.
pub fn apply_mtls(services: &mut [Service], policies: &[Arc<MtlsPolicy>]) -> PolicyOutcomes {
    let mut outcomes = PolicyOutcomes::new();
    // Who set each Service's mode, and each namespace's.
    let mut by_service: BTreeMap<(String, String), (String, TlsMode)> = BTreeMap::new();
    let mut by_namespace: BTreeMap<String, (String, TlsMode)> = BTreeMap::new();
    for (key, p) in ordered(policies) {
        let namespace = p.metadata.namespace.clone().unwrap_or_default();
        let outcome = check_fields(&p.spec, &["targetRefs", "mode"])
            .and_then(|()| mode(&p.spec))
            .map_err(|e| ("Invalid", e))
            .and_then(|mode| {
                if p.spec.get("targetRefs").is_none_or(Value::is_null) {
                    if let Some((other, _)) = by_namespace.get(&namespace) {
                        return Err(conflict("namespace", &namespace, other));
                    }
                    by_namespace.insert(namespace.clone(), (key.clone(), mode));
                    return Ok(());
                }
                let targets = targets(&p.spec).map_err(|e| ("Invalid", e))?;
                for t in &targets {
                    if let Some((other, _)) = by_service.get(&(namespace.clone(), t.clone())) {
                        return Err(conflict("Service", &format!("{namespace}/{t}"), other));
                    }
                }
                let found = services
                    .iter()
                    .any(|s| s.namespace == namespace && targets.contains(&s.name));
                if !found {
                    return Err(("TargetNotFound", "no targeted Service exists".into()));
                }
                for t in targets {
                    by_service.insert((namespace.clone(), t), (key.clone(), mode));
                }
                Ok(())
            });
        outcomes.insert(key, outcome);
    }
    for s in services.iter_mut() {
        let own = by_service.get(&(s.namespace.clone(), s.name.clone()));
        if let Some((_, mode)) = own.or_else(|| by_namespace.get(&s.namespace)) {
            s.tls_mode = Some(*mode);
            s.mtls |= *mode == TlsMode::Strict;
        }
    }
    outcomes
}

/// The annotation that sets a namespace's mTLS mode where no MTLSPolicy does.
pub const NAMESPACE_TLS_ANNOTATION: &str = "outrigger.io/inbound-tls";

/// Gives each Service without a mode the one its Namespace's annotation says. A value that
/// is neither `strict` nor `permissive` is ignored (and logged): a Namespace has no status to
/// say it on.
pub fn apply_namespace_modes(
    services: &mut [Service],
    namespaces: &[Arc<kube::core::PartialObjectMeta<k8s_openapi::api::core::v1::Namespace>>],
) {
    let mut modes = BTreeMap::new();
    for ns in namespaces {
        let Some(value) = ns
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(NAMESPACE_TLS_ANNOTATION))
        else {
            continue;
        };
        let name = ns.metadata.name.clone().unwrap_or_default();
        match value.as_str() {
            "strict" => modes.insert(name, TlsMode::Strict),
            "permissive" => modes.insert(name, TlsMode::Permissive),
            other => {
                tracing::warn!(namespace = %name, value = other, "{NAMESPACE_TLS_ANNOTATION} is neither `strict` nor `permissive`; ignored");
                None
            }
        };
    }
    for s in services.iter_mut().filter(|s| s.tls_mode.is_none()) {
        if let Some(mode) = modes.get(&s.namespace) {
            s.tls_mode = Some(*mode);
            s.mtls |= *mode == TlsMode::Strict;
        }
    }
}

fn conflict(what: &str, name: &str, other: &str) -> (&'static str, String) {
    (
        "Conflicted",
        format!("the {what} {name} already takes the mode of MTLSPolicy {other}"),
    )
}

fn mode(spec: &Value) -> Result<TlsMode, String> {
    match spec["mode"].as_str() {
        Some("Strict") => Ok(TlsMode::Strict),
        Some("Permissive") => Ok(TlsMode::Permissive),
        Some(other) => Err(format!(
            "spec.mode: `{other}` is neither `Strict` nor `Permissive`"
        )),
        None => Err("spec.mode is required".into()),
    }
}

/// Refuses a spec field the kind does not have, by name.
fn check_fields(spec: &Value, known: &[&str]) -> Result<(), String> {
    let fields = spec.as_object().ok_or("spec must be an object")?;
    match fields.keys().find(|k| !known.contains(&k.as_str())) {
        Some(extra) => Err(format!("spec.{extra} is not a field")),
        None => Ok(()),
    }
}

/// The spec without its `targetRefs`, read as the mesh file's section would be.
fn parse<T: serde::de::DeserializeOwned>(spec: &Value, required: &str) -> Result<T, String> {
    if spec.get(required).is_none_or(Value::is_null) {
        return Err(format!("spec.{required} is required"));
    }
    let mut body = snake_keys(spec);
    if let Some(map) = body.as_object_mut() {
        map.remove("target_refs");
    }
    serde_saphyr::from_str(&body.to_string()).map_err(|e| format!("spec: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(namespace: &str, name: &str) -> Service {
        let mesh = crate::mesh::Mesh::parse(
            "test",
            &format!("services: [{{name: {name}, namespace: {namespace}}}]"),
        )
        .unwrap();
        mesh.services.into_values().next().unwrap()
    }

    fn policy<P: serde::de::DeserializeOwned>(
        ns: &str,
        name: &str,
        age: u32,
        spec: Value,
    ) -> Arc<P> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"namespace": ns, "name": name,
                             "creationTimestamp": format!("2026-01-01T00:00:{age:02}Z")},
                "spec": spec,
            }))
            .unwrap(),
        )
    }

    #[test]
    fn authorization_policies_add_up_and_mistakes_are_named() {
        let mut services = vec![service("shop", "orders"), service("shop", "cart")];
        let target = json!([{"group": "", "kind": "Service", "name": "orders"}]);
        let policies: Vec<Arc<AuthorizationPolicy>> = vec![
            policy(
                "shop",
                "web",
                1,
                json!({"targetRefs": target,
                "allow": [{"from": [{"serviceAccount": "web"}], "paths": ["/api/*"]}]}),
            ),
            policy(
                "shop",
                "ops",
                2,
                json!({"targetRefs": target,
                "allow": [{"from": [{"namespace": "ops"}]}]}),
            ),
            policy(
                "shop",
                "typo",
                3,
                json!({"targetRefs": target,
                "allow": [{"form": [{"namespace": "ops"}]}]}),
            ),
            policy(
                "shop",
                "nobody",
                4,
                json!({"targetRefs": [{"kind": "Service", "name": "gone"}],
                "allow": []}),
            ),
            policy(
                "shop",
                "extra",
                5,
                json!({"targetRefs": target, "allow": [], "deny": []}),
            ),
        ];
        let outcomes = apply_authorization(&mut services, &policies, "cluster.local");
        assert_eq!(outcomes["shop/web"], Ok(()));
        assert_eq!(outcomes["shop/ops"], Ok(()));
        let typo = outcomes["shop/typo"].clone().unwrap_err();
        assert!(typo.0 == "Invalid" && typo.1.contains("form"), "{typo:?}");
        assert_eq!(
            outcomes["shop/nobody"].clone().unwrap_err().0,
            "TargetNotFound"
        );
        assert!(
            outcomes["shop/extra"]
                .clone()
                .unwrap_err()
                .1
                .contains("spec.deny")
        );
        let rules = &services[0].authorization.as_ref().unwrap().rules;
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].name, "shop/web/0");
        assert!(services[1].authorization.is_none());
    }

    #[test]
    fn a_services_mode_wins_over_its_namespaces_and_the_oldest_over_the_rest() {
        let mut services = vec![service("shop", "orders"), service("shop", "cart")];
        let policies: Vec<Arc<MtlsPolicy>> = vec![
            policy("shop", "all", 1, json!({"mode": "Strict"})),
            policy(
                "shop",
                "orders",
                2,
                json!({"mode": "Permissive",
                "targetRefs": [{"group": "", "kind": "Service", "name": "orders"}]}),
            ),
            policy("shop", "late", 3, json!({"mode": "Permissive"})),
            policy("shop", "bad", 4, json!({"mode": "strict"})),
        ];
        let outcomes = apply_mtls(&mut services, &policies);
        assert_eq!(services[0].tls_mode, Some(TlsMode::Permissive));
        assert_eq!(services[1].tls_mode, Some(TlsMode::Strict));
        assert!(services[1].mtls);
        assert_eq!(outcomes["shop/late"].clone().unwrap_err().0, "Conflicted");
        assert_eq!(outcomes["shop/bad"].clone().unwrap_err().0, "Invalid");
    }
}
