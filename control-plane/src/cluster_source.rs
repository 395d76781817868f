//! Services from the cluster: Kubernetes Services, their EndpointSlices and the Pods behind
//! them become mesh services, so that injected workloads are in the mesh without anyone
//! listing pod IPs.
//!
//! The mesh file still says what the cluster cannot: routes, policies, `calls`, tokens. A
//! file service without endpoints takes its endpoints, VIPs, port and identity from the
//! cluster Service of the same name and namespace; a file service with endpoints wins
//! outright. `cluster_watch` keeps the objects this reads up to date.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service as KubeService, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use outrigger_core::spiffe::SpiffeId;

use crate::mesh::{Mesh, Protocol, Service};

/// Set by the injector on every pod that has the sidecar.
pub const INJECTED: &str = "outrigger.io/injected";
/// Set on a Service by its owner: the service account its pods run as.
const SERVICE_ACCOUNT: &str = "outrigger.io/service-account";
/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME: &str = "kubernetes.io/service-name";

/// What the mesh needs to know of a pod: who it runs as, and whether it has the sidecar.
struct PodFacts<'a> {
    service_account: &'a str,
    injected: bool,
}

fn name_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (&str, &str) {
    (
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default(),
    )
}

/// Each TCP port of a Service becomes a mesh service: the main port (80 if the Service has
/// it, else the first) as `name.namespace`, the others as `name.namespace:port`. Endpoints
/// are the ready addresses of its EndpointSlices on that port. All ports get mTLS once a pod
/// behind the Service has the sidecar, and the identity of those pods' service account.
pub fn services_from(
    services: &[Arc<KubeService>],
    slices: &[Arc<EndpointSlice>],
    pods: &[Arc<Pod>],
    trust_domain: &str,
) -> Vec<Service> {
    let pods: HashMap<(&str, &str), PodFacts> = pods
        .iter()
        .map(|p| {
            let facts = PodFacts {
                service_account: p
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.as_deref())
                    .unwrap_or("default"),
                injected: p
                    .metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.contains_key(INJECTED)),
            };
            (name_of(&p.metadata), facts)
        })
        .collect();
    // Slices by the (namespace, name) of their Service, so that each Service finds its own
    // without a pass over every slice.
    let mut slices_of: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME))
        else {
            continue;
        };
        let namespace = slice.metadata.namespace.as_deref().unwrap_or_default();
        slices_of
            .entry((namespace, service.as_str()))
            .or_default()
            .push(slice);
    }
    let mut out = Vec::new();
    for svc in services {
        let (namespace, name) = name_of(&svc.metadata);
        let Some(spec) = &svc.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue;
        }
        // Every TCP port; the main one (port 80 if the Service has it, else the first) is
        // also what a host name without a port reaches.
        let mut ports: Vec<(&ServicePort, u16)> = spec
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| Some((p, u16::try_from(p.port).ok()?)))
            .collect();
        if ports.is_empty() {
            continue;
        }
        if let Some(i) = ports.iter().position(|(_, n)| *n == 80) {
            ports.swap(0, i);
        }
        let mut addresses: Vec<IpAddr> = spec
            .cluster_ips
            .iter()
            .flatten()
            .chain(spec.cluster_ip.as_ref())
            .filter_map(|ip| ip.parse().ok())
            .collect();
        addresses.dedup();

        let slices = slices_of
            .get(&(namespace, name))
            .map_or(&[][..], Vec::as_slice);
        let mut backing_pods = Vec::new();
        let mut per_port = Vec::with_capacity(ports.len());
        for (port, number) in &ports {
            let endpoints = ready_endpoints(slices, port, |pod| {
                backing_pods.push(pods.get(&(namespace, pod)));
            });
            per_port.push((*port, *number, endpoints));
        }
        // Neither is decided by what one pod says of itself. mTLS holds once any pod backing
        // the service has the sidecar: a pod without it cannot turn the service back to
        // plaintext, it only fails the handshakes it cannot answer. The identity is the one
        // the Service's owner names, else the service account most of its meshed pods run
        // as (ties go to the first by name), so one odd pod cannot change it either.
        let pods: Vec<&PodFacts> = backing_pods.iter().flatten().copied().collect();
        let mtls = pods.iter().any(|p| p.injected);
        let named = svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SERVICE_ACCOUNT))
            .map(String::as_str)
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
        let identity = SpiffeId::new(trust_domain, namespace, account);
        for (i, (port, number, endpoints)) in per_port.into_iter().enumerate() {
            out.push(Service {
                tls_mode: None,
                authorization: None,
                name: name.to_string(),
                namespace: namespace.to_string(),
                protocol: protocol_of(port),
                port: number,
                endpoints,
                routes: Vec::new(),
                calls: None,
                policy: Default::default(),
                identity: identity.clone(),
                addresses: addresses.clone(),
                mtls,
                extra_port: i > 0,
                only_routes: false,
                consumer_routes: BTreeMap::new(),
            });
        }
    }
    out
}

/// The ready addresses of `slices` on the Service port `port` (matched by name, as the
/// slices carry the target port under the Service port's name), sorted; `pod` is told the
/// name of each ready pod behind them.
fn ready_endpoints<'a>(
    slices: &[&'a EndpointSlice],
    port: &ServicePort,
    mut pod: impl FnMut(&'a str),
) -> Vec<(SocketAddr, u32)> {
    let port_name = port.name.as_deref().unwrap_or_default();
    let mut endpoints = Vec::new();
    for slice in slices {
        let Some(slice_port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or_default() == port_name)
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            // Absent means ready, as the API documents.
            if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            if let Some(target) = &endpoint.target_ref
                && target.kind.as_deref() == Some("Pod")
            {
                pod(target.name.as_deref().unwrap_or_default());
            }
            for ip in &endpoint.addresses {
                if let Ok(ip) = ip.parse::<IpAddr>() {
                    endpoints.push((SocketAddr::new(ip, slice_port), 1));
                }
            }
        }
    }
    endpoints.sort();
    endpoints.dedup();
    endpoints
}

/// The port's `appProtocol`, as Kubernetes names them; without one, its name (`grpc`,
/// `grpc-web`, `h2c-api`: the prefix before the first `-`), as the convention most meshes
/// follow; else HTTP/1.1, which the proxy upgrades where the client asks.
fn protocol_of(port: &ServicePort) -> Protocol {
    let named = || {
        let name = port.name.as_deref().unwrap_or_default();
        name.split('-')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase()
    };
    match port.app_protocol.as_deref() {
        Some("grpc") => Protocol::Grpc,
        Some("kubernetes.io/h2c" | "http2") => Protocol::Http2,
        Some("tcp") => Protocol::Tcp,
        Some(_) => Protocol::Http,
        None => match named().as_str() {
            "grpc" => Protocol::Grpc,
            "h2c" | "http2" => Protocol::Http2,
            "tcp" => Protocol::Tcp,
            _ => Protocol::Http,
        },
    }
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
/// The file's mTLS mode and authorization for a service, else the cluster's
/// (`MTLSPolicy`, `AuthorizationPolicy`).
fn inbound_from(f: &mut Service, c: &Service) {
    f.tls_mode = f.tls_mode.or(c.tls_mode);
    f.mtls |= f.tls_mode == Some(crate::mesh::TlsMode::Strict);
    if f.authorization.is_none() {
        f.authorization = c.authorization.clone();
    }
}

pub fn merge(file: &Mesh, cluster: &[Service]) -> Mesh {
    let mut mesh = file.clone();
    let services: &mut BTreeMap<String, Service> = &mut mesh.services;
    for c in cluster {
        // A file service with endpoints wins outright, over all of the Service's ports.
        let owned_by_file = |f: &Service| f.same_service(c) && !f.endpoints.is_empty();
        if c.extra_port && file.services.values().any(owned_by_file) {
            continue;
        }
        match services.get_mut(&c.cluster_name()) {
            Some(f) if f.endpoints.is_empty() => {
                f.endpoints = c.endpoints.clone();
                if f.addresses.is_empty() {
                    f.addresses = c.addresses.clone();
                }
                f.port = c.port;
                f.mtls |= c.mtls;
                f.identity = c.identity.clone();
                // The file's policy, field by field, else the cluster's ResiliencePolicy.
                f.policy = f.policy.or(&c.policy);
                // The file's routes, if it has any, else the cluster's HTTPRoutes.
                if f.routes.is_empty() {
                    f.routes = c.routes.clone();
                    f.only_routes = c.only_routes;
                }
                f.consumer_routes = c.consumer_routes.clone();
                inbound_from(f, c);
            }
            // The file's own endpoints: only the cluster's inbound policy is taken.
            Some(f) => inbound_from(f, c),
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
    use serde_json::{Value, json};

    fn typed<K: serde::de::DeserializeOwned>(list: &Value) -> Vec<Arc<K>> {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| Arc::new(serde_json::from_value(v.clone()).unwrap()))
            .collect()
    }

    fn services_from(
        services: &Value,
        slices: &Value,
        pods: &Value,
        trust_domain: &str,
    ) -> Vec<Service> {
        super::services_from(&typed(services), &typed(slices), &typed(pods), trust_domain)
    }

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
    fn every_tcp_port_is_meshed_and_port_80_is_the_main_one() {
        let (mut services, mut slices, pods) = cluster();
        services["items"][0]["spec"]["ports"] = json!([
            {"name": "grpc-api", "port": 9000, "targetPort": 9900, "protocol": "TCP"},
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "http", "port": 80, "targetPort": 9090, "protocol": "TCP"}]);
        slices["items"][0]["ports"] = json!([
            {"name": "grpc-api", "port": 9900, "protocol": "TCP"},
            {"name": "http", "port": 9090, "protocol": "TCP"}]);
        let found = services_from(&services, &slices, &pods, "cluster.local");
        let names: Vec<String> = found.iter().map(Service::cluster_name).collect();
        assert_eq!(names, ["catalog.shop", "catalog.shop:9000"]);
        let (main, grpc) = (&found[0], &found[1]);
        assert_eq!((main.port, main.protocol), (80, Protocol::Http));
        assert_eq!((grpc.port, grpc.protocol), (9000, Protocol::Grpc));
        assert_eq!(grpc.endpoints[0].0.port(), 9900);
        assert_eq!(grpc.identity, main.identity);
        assert!(grpc.mtls);
        // Only the main port answers to a name without a port.
        assert!(main.hostnames().contains(&"catalog.shop".to_string()));
        let grpc_names = grpc.hostnames();
        assert!(!grpc_names.contains(&"catalog.shop".to_string()));
        assert!(grpc_names.contains(&"catalog.shop:9000".to_string()));
        assert!(grpc_names.contains(&"10.96.0.50:9000".to_string()));
    }

    #[test]
    fn a_caller_allowed_a_service_may_call_all_its_ports() {
        let file = Mesh::parse(
            "mesh.yaml",
            "services:\n  - name: web\n    namespace: shop\n    calls: [catalog]\n  - name: catalog\n    namespace: shop\n",
        )
        .unwrap();
        let (mut services, slices, pods) = cluster();
        services["items"][0]["spec"]["ports"] = json!([
            {"name": "http", "port": 80, "protocol": "TCP"},
            {"name": "admin", "port": 8080, "protocol": "TCP"}]);
        let mesh = merge(
            &file,
            &services_from(&services, &slices, &pods, "cluster.local"),
        );
        let scope = mesh.scope_for("web").unwrap();
        assert!(scope.contains("catalog.shop:8080"), "{scope:?}");
    }

    #[test]
    fn the_protocol_comes_from_app_protocol_then_the_port_name() {
        let port = |name: &str, app: Option<&str>| ServicePort {
            name: Some(name.to_string()),
            app_protocol: app.map(str::to_string),
            port: 80,
            ..Default::default()
        };
        let cases = [
            (port("web", Some("grpc")), Protocol::Grpc),
            (port("grpc", Some("http")), Protocol::Http),
            (port("x", Some("kubernetes.io/h2c")), Protocol::Http2),
            (port("grpc-api", None), Protocol::Grpc),
            (port("db", Some("tcp")), Protocol::Tcp),
            (port("tcp-mysql", None), Protocol::Tcp),
            (port("GRPC", None), Protocol::Grpc),
            (port("h2c-internal", None), Protocol::Http2),
            (port("http2", None), Protocol::Http2),
            (port("grpcish", None), Protocol::Http),
            (port("http", None), Protocol::Http),
        ];
        for (port, want) in cases {
            assert_eq!(
                protocol_of(&port),
                want,
                "{:?} {:?}",
                port.name,
                port.app_protocol
            );
        }
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
