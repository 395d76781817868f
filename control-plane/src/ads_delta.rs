//! The Aggregated Discovery Service, incremental (delta) variant.
//!
//! Each resource has its own version: a hash of its bytes, so it moves only when the resource
//! does. A stream remembers what the client holds (from our pushes, and from
//! `initial_resource_versions` after a reconnect) and sends only what changed plus the names
//! that went away. `system_version_info` carries the type's snapshot version, which is what an
//! ACK or NACK is recorded against.

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use envoy_types::pb::google::protobuf::Any;
use futures_util::SinkExt;
use tonic::Status;

use crate::ads_stream::{Protocol, StreamLink};
use crate::ads_transport::grpc_frame;
use crate::snapshot::Snapshot;
use crate::xds_limits;

/// Pushes of one type waiting for their ACK on one stream.
const MAX_IN_FLIGHT: usize = 16;

/// A resource's version: a hash of its encoded bytes.
pub fn resource_version(any: &Any) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    any.value.hash(&mut h);
    format!("{:016x}", h.finish())
}

#[derive(Default)]
struct DeltaSub {
    wildcard: bool,
    names: BTreeSet<String>,
    /// What the client holds: name → version.
    known: HashMap<String, String>,
    /// Nonce → the type version it carried, for recording ACKs and NACKs.
    in_flight: HashMap<String, u64>,
}

impl DeltaSub {
    /// The resources this subscriber should hold now.
    fn desired<'a>(&self, snapshot: &'a Snapshot, type_url: &str) -> Vec<(&'a String, &'a Any)> {
        let Some(t) = snapshot.types.get(type_url) else {
            return Vec::new();
        };
        let r = &t.resources;
        r.by_name
            .iter()
            .filter(|(n, _)| {
                if crate::translate::is_internal(n) {
                    false
                } else if self.wildcard {
                    !r.named_only.contains(*n) || self.names.contains(*n)
                } else {
                    self.names.contains(*n)
                }
            })
            .collect()
    }
}

pub struct DeltaStream {
    link: StreamLink,
    subs: HashMap<String, DeltaSub>,
}

impl Protocol for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;

    fn node(req: &DeltaDiscoveryRequest) -> Option<&Node> {
        req.node.as_ref()
    }

    fn check(req: &DeltaDiscoveryRequest) -> Result<(), Status> {
        let names = req.resource_names_subscribe.len()
            + req.resource_names_unsubscribe.len()
            + req.initial_resource_versions.len();
        if names > xds_limits::MAX_NAMES {
            return Err(Status::resource_exhausted(format!(
                "at most {} resource names in a request",
                xds_limits::MAX_NAMES
            )));
        }
        let all = req
            .resource_names_subscribe
            .iter()
            .chain(&req.resource_names_unsubscribe)
            .chain(req.initial_resource_versions.keys())
            .chain(req.initial_resource_versions.values())
            .collect::<Vec<_>>();
        xds_limits::check_names(&req.type_url, "", all.into_iter())
    }

    fn open(link: StreamLink) -> Self {
        DeltaStream {
            link,
            subs: HashMap::new(),
        }
    }

    fn link(&self) -> &StreamLink {
        &self.link
    }

    /// Sends what changed for `type_url`; with `always`, sends even an empty response (the
    /// first answer to a subscription, which the client waits for).
    async fn push(&mut self, snapshot: &Snapshot, type_url: &str, always: bool) -> bool {
        let Some(sub) = self.subs.get_mut(type_url) else {
            return true;
        };
        let desired = sub.desired(snapshot, type_url);
        let mut resources = Vec::new();
        let mut keep = BTreeSet::new();
        for (name, any) in desired {
            keep.insert(name.clone());
            let version = resource_version(any);
            if sub.known.get(name) != Some(&version) {
                resources.push(Resource {
                    name: name.clone(),
                    version: version.clone(),
                    resource: Some(any.clone()),
                    ..Default::default()
                });
                sub.known.insert(name.clone(), version);
            }
        }
        let removed: Vec<String> = sub
            .known
            .keys()
            .filter(|n| !keep.contains(*n))
            .cloned()
            .collect();
        for n in &removed {
            sub.known.remove(n);
        }
        if resources.is_empty() && removed.is_empty() && !always {
            return true;
        }
        let version = snapshot.version_of(type_url);
        let nonce = self.link.next_nonce();
        // A client that never answers must not grow this: only the newest pushes are kept
        // waiting for their ACK.
        if sub.in_flight.len() >= MAX_IN_FLIGHT
            && let Some(oldest) = sub
                .in_flight
                .iter()
                .min_by_key(|(_, v)| **v)
                .map(|(n, _)| n.clone())
        {
            sub.in_flight.remove(&oldest);
        }
        sub.in_flight.insert(nonce.clone(), version);
        self.link.sent(type_url, version);
        let response = DeltaDiscoveryResponse {
            system_version_info: version.to_string(),
            resources,
            type_url: type_url.to_string(),
            removed_resources: removed,
            nonce,
            ..Default::default()
        };
        self.link.out.send(Ok(grpc_frame(&response))).await.is_ok()
    }

    async fn on_request(&mut self, req: DeltaDiscoveryRequest, snapshot: &Snapshot) -> bool {
        if !xds_limits::served(&req.type_url) {
            return true;
        }
        let first = !self.subs.contains_key(&req.type_url);
        let sub = self.subs.entry(req.type_url.clone()).or_default();
        // An empty nonce (a new subscription) is never in flight.
        if let Some(version) = sub.in_flight.remove(&req.response_nonce) {
            let version = version.to_string();
            match &req.error_detail {
                Some(err) => {
                    tracing::warn!(node = %self.link.node, type_url = %req.type_url, error = %err.message, "delta NACK");
                    self.link.nacked(&req.type_url, &version, &err.message);
                }
                None => self.link.acked(&req.type_url, &version),
            }
        }
        if first {
            // No names on the first request (or "*") is a wildcard subscription.
            sub.wildcard = req.resource_names_subscribe.is_empty()
                || req.resource_names_subscribe.iter().any(|n| n == "*");
            sub.known = req.initial_resource_versions.clone();
        }
        let mut changed = false;
        for n in req.resource_names_subscribe.iter().filter(|n| *n != "*") {
            changed |= sub.names.insert(n.clone());
        }
        for n in &req.resource_names_unsubscribe {
            changed |= sub.names.remove(n);
        }
        // Subscriptions add up over requests: the total is bounded, not only each request.
        if sub.names.len() > xds_limits::MAX_NAMES {
            let _ = self
                .link
                .out
                .send(Err(Status::resource_exhausted(format!(
                    "at most {} resource names subscribed per type",
                    xds_limits::MAX_NAMES
                ))))
                .await;
            return false;
        }
        if first || changed {
            let type_url = req.type_url;
            return self.push(snapshot, &type_url, first).await;
        }
        true
    }
}
