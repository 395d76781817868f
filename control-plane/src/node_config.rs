//! `GET /node-config?node=ID` on the admin port: what the control plane serves a node (any
//! xDS client: our proxy, an Envoy, a gRPC app), as routes, clusters and endpoints, beside the
//! versions it sent and the node ACKed. `proxy-config --node` shows it: for an Envoy or a gRPC
//! app this is the view from the control plane's side, since they have no `/config` of ours.

use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{address, socket_address};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, route, route_action};
use prost::Message;
use serde_json::{Value, json};

use crate::node_status::NodeRegistry;
use crate::snapshot::Snapshot;
use crate::translate::{CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE};
use outrigger_core::spiffe::SpiffeId;

pub fn node_config_json(
    snapshot: &Arc<Snapshot>,
    nodes: &NodeRegistry,
    query: Option<&str>,
) -> Result<Value, String> {
    let id = outrigger_core::query::param(query, "node")
        .ok_or_else(|| "node-config: ?node=<node id> is required\n".to_string())?;
    let node = nodes
        .node(&id)
        .ok_or_else(|| format!("node-config: no node `{id}` has connected\n"))?;
    // The view its stream was given: by proven identity, else by the service it named.
    let view = match node.identity.as_deref().map(SpiffeId::parse) {
        Some(Ok(proven)) => snapshot.view_for_identity(&proven),
        _ => snapshot.view_for(&node.cluster),
    };
    let endpoints: Vec<(String, Vec<String>)> = view
        .select(ENDPOINT_TYPE, &[])
        .iter()
        .filter_map(|any| ClusterLoadAssignment::decode(any.value.as_slice()).ok())
        .map(|cla| (cla.cluster_name.clone(), addresses(&cla)))
        .collect();
    let clusters: Vec<Value> = view
        .select(CLUSTER_TYPE, &[])
        .iter()
        .filter_map(|any| Cluster::decode(any.value.as_slice()).ok())
        .map(|c| {
            let eds = c
                .eds_cluster_config
                .as_ref()
                .map(|e| e.service_name.clone())
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| c.name.clone());
            let addrs = endpoints
                .iter()
                .find(|(name, _)| *name == eds)
                .map(|(_, a)| a.clone())
                .unwrap_or_default();
            json!({
                "name": c.name,
                "protocol": if c.typed_extension_protocol_options.is_empty() { "http1" } else { "http2" },
                "lb": format!("{:?}", c.lb_policy()),
                // Outlier state lives in the node, which does not tell the control plane.
                "endpoints": addrs.iter().map(|a| json!({"address": a})).collect::<Vec<_>>(),
            })
        })
        .collect();
    let listeners: Vec<Value> = view
        .select(ROUTE_TYPE, &[])
        .iter()
        .filter_map(|any| RouteConfiguration::decode(any.value.as_slice()).ok())
        .map(|rc| {
            json!({
                "name": rc.name,
                "virtual_hosts": rc.virtual_hosts.iter().map(|vh| json!({
                    "name": vh.name,
                    "domains": vh.domains,
                    "routes": vh.routes.iter().map(route_json).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let versions: serde_json::Map<String, Value> = node
        .types
        .iter()
        .map(|(t, s)| {
            (
                t.to_string(),
                json!({"sent_version": s.sent_version.map(|v| v.to_string()), "acked_version": s.acked_version, "refusing": s.refusing}),
            )
        })
        .collect();
    Ok(json!({
        "node": id,
        "cluster": node.cluster,
        "identity": node.identity,
        "connected": node.streams > 0,
        "versions": versions,
        "snapshot": {"listeners": listeners, "clusters": clusters},
    }))
}

fn route_json(r: &envoy_types::pb::envoy::config::route::v3::Route) -> Value {
    let (backends, timeout_ms) = match &r.action {
        Some(route::Action::Route(action)) => {
            let backends: Vec<Value> = match &action.cluster_specifier {
                Some(route_action::ClusterSpecifier::Cluster(c)) => {
                    vec![json!({"cluster": c, "weight": 1})]
                }
                Some(route_action::ClusterSpecifier::WeightedClusters(w)) => w
                    .clusters
                    .iter()
                    .map(|c| json!({"cluster": c.name, "weight": c.weight.as_ref().map_or(0, |v| v.value)}))
                    .collect(),
                _ => Vec::new(),
            };
            let timeout = action
                .timeout
                .as_ref()
                .and_then(outrigger_core::xds::std_duration)
                .map(|d| d.as_millis() as u64);
            (backends, timeout)
        }
        _ => (Vec::new(), None),
    };
    json!({"name": r.name, "backends": backends, "timeout_ms": timeout_ms})
}

fn addresses(cla: &ClusterLoadAssignment) -> Vec<String> {
    cla.endpoints
        .iter()
        .flat_map(|l| &l.lb_endpoints)
        .filter_map(|lb| match &lb.host_identifier {
            Some(
                envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier::Endpoint(
                    e,
                ),
            ) => e.address.as_ref(),
            _ => None,
        })
        .filter_map(|a| match &a.address {
            Some(address::Address::SocketAddress(s)) => {
                let port = match s.port_specifier {
                    Some(socket_address::PortSpecifier::PortValue(p)) => p,
                    _ => 0,
                };
                Some(format!("{}:{port}", s.address))
            }
            _ => None,
        })
        .collect()
}
