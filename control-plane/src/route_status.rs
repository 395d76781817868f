//! Writes what became of each HTTPRoute back to its status, as the Gateway API requires: for
//! each Service it attaches to, an entry under `status.parents` with this mesh's controller
//! name and the `Accepted` and `ResolvedRefs` conditions. Entries of other controllers are
//! kept; ours are written only when they change (a condition's `lastTransitionTime` moves
//! only when its status does), so an unchanged cluster costs no writes.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use crate::gateway_api::{GrpcRoute, HttpRoute, RouteParentStatus};
use crate::gateway_routes::{Outcome, RouteOutcomes};

/// Our name in `status.parents[].controllerName`.
pub const CONTROLLER: &str = "outrigger.io/mesh";

/// Routes written, by `namespace/name`, with the resourceVersion the write replaced: until
/// the watch shows a newer one, the route's view here is older than what was written.
pub type Written = HashMap<String, String>;

/// A Gateway API route kind whose status this writes.
pub trait RouteObject:
    kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
{
    fn parents(&self) -> Vec<RouteParentStatus>;
}

impl RouteObject for HttpRoute {
    fn parents(&self) -> Vec<RouteParentStatus> {
        self.status.clone().unwrap_or_default().parents
    }
}

impl RouteObject for GrpcRoute {
    fn parents(&self) -> Vec<RouteParentStatus> {
        self.status.clone().unwrap_or_default().parents
    }
}

/// Writes the status of every route in `routes` whose conditions differ from `outcomes`.
pub async fn write<K: RouteObject>(
    client: &kube::Client,
    routes: &[Arc<K>],
    outcomes: &RouteOutcomes,
    written: &mut Written,
) {
    written.retain(|key, _| outcomes.0.contains_key(key));
    for route in routes {
        let meta = route.meta();
        let namespace = meta.namespace.as_deref().unwrap_or_default();
        let name = meta.name.as_deref().unwrap_or_default();
        let key = format!("{namespace}/{name}");
        let version = meta.resource_version.clone().unwrap_or_default();
        if written.get(&key) == Some(&version) {
            continue;
        }
        let Some((generation, outcomes)) = outcomes.0.get(&key) else {
            continue;
        };
        let current = route.parents();
        let ours: Vec<RouteParentStatus> = outcomes
            .iter()
            .map(|o| entry(o, *generation, &current))
            .collect();
        let mine = |p: &&RouteParentStatus| p.controller_name == CONTROLLER;
        if current.iter().filter(mine).eq(ours.iter()) {
            continue;
        }
        let parents: Vec<&RouteParentStatus> = current
            .iter()
            .filter(|p| p.controller_name != CONTROLLER)
            .chain(&ours)
            .collect();
        // Conditional on the version read: a route that changed meanwhile is written again
        // once its new version is seen.
        let patch = json!({
            "metadata": {"resourceVersion": meta.resource_version},
            "status": {"parents": parents},
        });
        patch_status::<K>(client, (namespace, name), patch, (key, version), written).await;
    }
}

/// Merge-patches the status of the object `(namespace, name)` (the patch carries the
/// resourceVersion it was made from), and remembers the write under `key` against that
/// version. Shared by the routes' and the policies' status writers.
pub async fn patch_status<K>(
    client: &kube::Client,
    (namespace, name): (&str, &str),
    patch: serde_json::Value,
    (key, version): (String, String),
    written: &mut Written,
) where
    K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    match api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            written.insert(key, version);
        }
        Err(e) => tracing::warn!(object = %key, error = %e, "cannot write the status"),
    }
}

/// Our entry for one parent, keeping each condition's transition time while its status holds.
fn entry(outcome: &Outcome, generation: i64, current: &[RouteParentStatus]) -> RouteParentStatus {
    let before = current
        .iter()
        .find(|p| p.controller_name == CONTROLLER && p.parent_ref == outcome.parent);
    let condition = |kind: &str, result: &Result<(), (&'static str, String)>, ok: &str| {
        let (status, reason, message) = match result {
            Ok(()) => ("True", ok.to_string(), String::new()),
            Err((reason, message)) => ("False", reason.to_string(), message.clone()),
        };
        let since = before
            .and_then(|b| b.conditions.iter().find(|c| c.type_ == kind))
            .filter(|c| c.status == status)
            .map_or_else(
                || Time(Timestamp::now()),
                |c| c.last_transition_time.clone(),
            );
        Condition {
            type_: kind.to_string(),
            status: status.to_string(),
            reason,
            message,
            observed_generation: Some(generation),
            last_transition_time: since,
        }
    };
    RouteParentStatus {
        parent_ref: outcome.parent.clone(),
        controller_name: CONTROLLER.to_string(),
        conditions: vec![
            condition("Accepted", &outcome.accepted, "Accepted"),
            condition("ResolvedRefs", &outcome.resolved_refs, "ResolvedRefs"),
        ],
    }
}
