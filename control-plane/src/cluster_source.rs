//! Services from the cluster: Kubernetes Services, their EndpointSlices and the Pods behind
//! them become mesh services, so that injected workloads are in the mesh without anyone
//! listing pod IPs.
//!
//! The mesh file still says what the cluster cannot: routes, policies, `calls`, tokens. A
//! file service without endpoints takes its endpoints, VIPs, port and identity from the
//! cluster Service of the same name and namespace; a file service with endpoints wins
//! outright. The cluster is listed on an interval (not watched); a failed listing keeps the
//! last good view.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use outrigger_core::spiffe::SpiffeId;
use serde_json::Value;

use crate::kube_api::KubeApi;
use crate::mesh::{Mesh, Protocol, Service};

const SERVICES: &str = "/api/v1/services";
const ENDPOINT_SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const PODS: &str = "/api/v1/pods";
/// Set by the injector on every pod that has the sidecar.
const INJECTED: &str = "outrigger.io/injected";

/// Lists the cluster and turns it into mesh services.
pub async fn fetch(api: &KubeApi, trust_domain: &str) -> Result<Vec<Service>, String> {
    let (services, slices, pods) =
        tokio::try_join!(api.get(SERVICES), api.get(ENDPOINT_SLICES), api.get(PODS))?;
    Ok(services_from(&services, &slices, &pods, trust_domain))
}

fn items(list: &Value) -> &[Value] {
    list["items"].as_array().map_or(&[], Vec::as_slice)
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// What the mesh needs to know of a pod: who it runs as, and whether it has the sidecar.
struct PodFacts<'a> {
    service_account: &'a str,
    injected: bool,
}

/// Each Service with a TCP port becomes one mesh service on its first TCP port. Endpoints are
/// the ready addresses of its EndpointSlices on that port. It gets mTLS when every endpoint
/// is a pod with the sidecar, and the identity of those pods' service account.
pub fn services_from(
    services: &Value,
    slices: &Value,
    pods: &Value,
    trust_domain: &str,
) -> Vec<Service> {
    let pods: HashMap<(&str, &str), PodFacts> = items(pods)
        .iter()
        .map(|p| {
            let key = (
                str_at(p, "/metadata/namespace"),
                str_at(p, "/metadata/name"),
            );
            let facts = PodFacts {
                service_account: p
                    .pointer("/spec/serviceAccountName")
                    .and_then(Value::as_str)
                    .unwrap_or("default"),
                injected: p
                    .pointer("/metadata/annotations")
                    .is_some_and(|a| a.get(INJECTED).is_some()),
            };
            (key, facts)
        })
        .collect();
    let mut out = Vec::new();
    for svc in items(services) {
        let (name, namespace) = (
            str_at(svc, "/metadata/name"),
            str_at(svc, "/metadata/namespace"),
        );
        if str_at(svc, "/spec/type") == "ExternalName" {
            continue;
        }
        let Some(port) = svc["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["protocol"].as_str().unwrap_or("TCP") == "TCP")
        else {
            continue;
        };
        let Some(number) = port["port"].as_u64().and_then(|p| u16::try_from(p).ok()) else {
            continue;
        };
        let port_name = port["name"].as_str().unwrap_or_default();
        let protocol = match port["appProtocol"].as_str().unwrap_or_default() {
            "grpc" => Protocol::Grpc,
            "kubernetes.io/h2c" | "http2" => Protocol::Http2,
            _ => Protocol::Http,
        };
        let mut addresses: Vec<IpAddr> = svc["spec"]["clusterIPs"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(std::iter::once(&svc["spec"]["clusterIP"]))
            .filter_map(|ip| ip.as_str()?.parse().ok())
            .collect();
        addresses.dedup();

        let mut endpoints = Vec::new();
        let mut backing_pods = Vec::new();
        for slice in items(slices).iter().filter(|s| {
            str_at(s, "/metadata/namespace") == namespace
                && s.pointer("/metadata/labels/kubernetes.io~1service-name")
                    .and_then(Value::as_str)
                    == Some(name)
        }) {
            let Some(slice_port) = slice["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"].as_str().unwrap_or_default() == port_name)
                .and_then(|p| p["port"].as_u64())
                .and_then(|p| u16::try_from(p).ok())
            else {
                continue;
            };
            for endpoint in slice["endpoints"].as_array().into_iter().flatten() {
                // Absent means ready, as the API documents.
                if endpoint.pointer("/conditions/ready") == Some(&Value::Bool(false)) {
                    continue;
                }
                if str_at(endpoint, "/targetRef/kind") == "Pod" {
                    backing_pods.push(pods.get(&(namespace, str_at(endpoint, "/targetRef/name"))));
                }
                for ip in endpoint["addresses"].as_array().into_iter().flatten() {
                    if let Some(ip) = ip.as_str().and_then(|ip| ip.parse::<IpAddr>().ok()) {
                        endpoints.push((SocketAddr::new(ip, slice_port), 1));
                    }
                }
            }
        }
        endpoints.sort();
        endpoints.dedup();
        // Neither is decided by what one pod says of itself. mTLS holds once any pod backing
        // the service has the sidecar: a pod without it cannot turn the service back to
        // plaintext, it only fails the handshakes it cannot answer. The identity is the one
        // the Service's owner names, else the service account most of its meshed pods run
        // as (ties go to the first by name), so one odd pod cannot change it either.
        let pods: Vec<&PodFacts> = backing_pods.iter().flatten().copied().collect();
        let mtls = pods.iter().any(|p| p.injected);
        let named = svc
            .pointer("/metadata/annotations/outrigger.io~1service-account")
            .and_then(Value::as_str)
            .filter(|a| !a.is_empty());
        let account = named
            .or_else(|| {
                most_common(
                    pods.iter()
                        .filter(|p| p.injected || !mtls)
                        .map(|p| p.service_account),
                )
            })
            .unwrap_or(name);
        out.push(Service {
            name: name.to_string(),
            namespace: namespace.to_string(),
            protocol,
            port: number,
            endpoints,
            routes: Vec::new(),
            calls: None,
            policy: Default::default(),
            identity: SpiffeId::new(trust_domain, namespace, account),
            addresses,
            mtls,
        });
    }
    out
}

/// The value that occurs most often; ties go to the smallest.
fn most_common<'a>(values: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for v in values {
        *counts.entry(v).or_default() += 1;
    }
    let top = counts.values().copied().max()?;
    counts.into_iter().find(|(_, n)| *n == top).map(|(v, _)| v)
}

/// The mesh file's view with the cluster's services folded in (see the module comment).
pub fn merge(file: &Mesh, cluster: &[Service]) -> Mesh {
    let mut mesh = file.clone();
    let services: &mut BTreeMap<String, Service> = &mut mesh.services;
    for c in cluster {
        match services.get_mut(&c.cluster_name()) {
            Some(f) if f.endpoints.is_empty() => {
                f.endpoints = c.endpoints.clone();
                if f.addresses.is_empty() {
                    f.addresses = c.addresses.clone();
                }
                f.port = c.port;
                f.mtls |= c.mtls;
                f.identity = c.identity.clone();
            }
            Some(_) => {}
            None => {
                services.insert(c.cluster_name(), c.clone());
            }
        }
    }
    mesh
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cluster() -> (Value, Value, Value) {
        let services = json!({"kind": "ServiceList", "items": [
            {"metadata": {"name": "catalog", "namespace": "shop"},
             "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.50", "clusterIPs": ["10.96.0.50"],
                      "ports": [{"name": "http", "port": 80, "targetPort": 9090, "protocol": "TCP"}]}},
            {"metadata": {"name": "dns", "namespace": "kube-system"},
             "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}},
            {"metadata": {"name": "legacy", "namespace": "shop"},
             "spec": {"type": "ExternalName", "externalName": "db.example.com"}},
        ]});
        let slices = json!({"kind": "EndpointSliceList", "items": [
            {"metadata": {"name": "catalog-abc", "namespace": "shop",
                          "labels": {"kubernetes.io/service-name": "catalog"}},
             "addressType": "IPv4",
             "ports": [{"name": "http", "port": 9090, "protocol": "TCP"}],
             "endpoints": [
                {"addresses": ["10.244.1.5"], "conditions": {"ready": true},
                 "targetRef": {"kind": "Pod", "name": "catalog-1", "namespace": "shop"}},
                {"addresses": ["10.244.2.7"], "conditions": {"ready": false},
                 "targetRef": {"kind": "Pod", "name": "catalog-2", "namespace": "shop"}},
                {"addresses": ["10.244.3.9"],
                 "targetRef": {"kind": "Pod", "name": "catalog-3", "namespace": "shop"}}]}
        ]});
        let pods = json!({"kind": "PodList", "items": [
            {"metadata": {"name": "catalog-1", "namespace": "shop", "annotations": {"outrigger.io/injected": "native"}},
             "spec": {"serviceAccountName": "catalog-sa"}},
            {"metadata": {"name": "catalog-3", "namespace": "shop", "annotations": {"outrigger.io/injected": "native"}},
             "spec": {"serviceAccountName": "catalog-sa"}},
        ]});
        (services, slices, pods)
    }

    #[test]
    fn services_endpoints_and_identity_come_from_the_cluster() {
        let (services, slices, pods) = cluster();
        let found = services_from(&services, &slices, &pods, "cluster.local");
        // UDP-only and ExternalName services are not the mesh's.
        assert_eq!(found.len(), 1);
        let catalog = &found[0];
        assert_eq!(catalog.cluster_name(), "catalog.shop");
        assert_eq!(catalog.port, 80);
        assert_eq!(
            catalog.addresses,
            vec!["10.96.0.50".parse::<IpAddr>().unwrap()]
        );
        // The not-ready endpoint is left out; endpoints listen on the target port.
        let addrs: Vec<String> = catalog
            .endpoints
            .iter()
            .map(|(a, _)| a.to_string())
            .collect();
        assert_eq!(addrs, ["10.244.1.5:9090", "10.244.3.9:9090"]);
        assert!(catalog.mtls);
        assert_eq!(
            catalog.identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/catalog-sa"
        );
    }

    #[test]
    fn one_pod_without_the_sidecar_cannot_turn_mtls_off() {
        let (services, slices, mut pods) = cluster();
        pods["items"][1]["metadata"]["annotations"] = json!({});
        let found = services_from(&services, &slices, &pods, "cluster.local");
        assert!(found[0].mtls);
        // With none of its pods meshed, the service is plaintext.
        for pod in pods["items"].as_array_mut().unwrap() {
            pod["metadata"]["annotations"] = json!({});
        }
        let found = services_from(&services, &slices, &pods, "cluster.local");
        assert!(!found[0].mtls);
    }

    #[test]
    fn one_odd_pod_cannot_choose_the_identity() {
        let (services, slices, mut pods) = cluster();
        let mut services = services;
        // Half the pods now run as another account: the Service's owner settles it.
        pods["items"][0]["spec"]["serviceAccountName"] = json!("aaa-intruder");
        services["items"][0]["metadata"]["annotations"] =
            json!({"outrigger.io/service-account": "catalog-sa"});
        let found = services_from(&services, &slices, &pods, "cluster.local");
        assert_eq!(
            found[0].identity.to_string(),
            "spiffe://cluster.local/ns/shop/sa/catalog-sa"
        );
        // Without that, the majority does; one pod among many cannot.
        assert_eq!(most_common(["b", "a", "b"].into_iter()), Some("b"));
        assert_eq!(most_common(["b", "a"].into_iter()), Some("a"));
    }
}
