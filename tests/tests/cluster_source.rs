//! Services from the cluster: a Kubernetes API server (fake, over real TLS, speaking the real
//! list/watch protocol) holds Services, EndpointSlices and Pods; the control plane watches
//! them and folds them into the mesh file, and a proxy on xDS routes by the Service's DNS
//! names and VIP to the ready endpoints, following them as they move. Watches that drop are
//! resumed, a `410 Gone` lists again, and a failing API server leaves the last view serving.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::listener::v3::Listener;
use outrigger_control_plane::app::ControlPlane;
use outrigger_core::inbound::TlsMode;
use outrigger_core::xds_inbound::read_inbound;
use outrigger_tests::clients::{TestClient, get};
use outrigger_tests::fake_kube::FakeApiServer;
use outrigger_tests::kube::{assert_typed, yaml_documents};
use outrigger_tests::{TestProxy, eventually, metric, upstreams};
use serde_json::Value;

/// `catalog` (also in the mesh file, with a retry policy but no endpoints) and `ledger`
/// (only in the cluster), and the pod behind `catalog`.
const CLUSTER: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: catalog, namespace: shop}
spec:
  clusterIP: 10.96.0.50
  clusterIPs: [10.96.0.50]
  ports:
    - {name: admin, port: 8080, targetPort: 9091, protocol: TCP}
    - {name: http, port: 80, targetPort: 9090, protocol: TCP}
---
apiVersion: v1
kind: Service
metadata: {name: ledger, namespace: shop}
spec:
  clusterIP: 10.96.0.51
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: v1
kind: Pod
metadata: {name: catalog-1, namespace: shop}
spec:
  serviceAccountName: catalog-sa
  containers: [{name: app, image: "catalog:1"}]
"#;

/// `service`'s EndpointSlice for its `http` port: `endpoint` ready, and one more address that
/// is not.
fn slice(service: &str, endpoint: SocketAddr) -> Value {
    port_slice(service, "http", endpoint)
}

/// `service`'s EndpointSlice for its port `port_name`.
fn port_slice(service: &str, port_name: &str, endpoint: SocketAddr) -> Value {
    let yaml = format!(
        r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {service}-{port_name}
  namespace: shop
  labels: {{kubernetes.io/service-name: {service}}}
addressType: IPv4
ports: [{{name: {port_name}, port: {port}, protocol: TCP}}]
endpoints:
  - addresses: ["{ip}"]
    conditions: {{ready: true}}
    targetRef: {{kind: Pod, name: {service}-1, namespace: shop}}
  - addresses: [127.0.0.9]
    conditions: {{ready: false}}
"#,
        port = endpoint.port(),
        ip = endpoint.ip()
    );
    typed(&yaml).remove(0)
}

/// The documents of `yaml`, each checked against its typed Kubernetes object.
fn typed(yaml: &str) -> Vec<Value> {
    let docs = yaml_documents(yaml);
    docs.iter().for_each(assert_typed);
    docs
}

const MESH: &str = r#"services:
  - name: catalog
    namespace: shop
    policy:
      retry: {attempts: 2, on: [gateway-error]}
"#;

/// A control plane watching `api`, and a proxy following it.
struct Mesh {
    cp: ControlPlane,
    client: TestClient,
    _proxy: TestProxy,
}

impl Mesh {
    async fn start(api: &FakeApiServer) -> Mesh {
        let cp = outrigger_tests::control_plane(MESH).await;
        cp.watch_cluster(api.client(), None);
        let (proxy, client) = outrigger_tests::xds_proxy(cp.xds_addr).await;
        Mesh {
            cp,
            client,
            _proxy: proxy,
        }
    }

    /// Started, routing `catalog` to `catalog-v1`, with a watch open on each kind.
    async fn watching(api: &FakeApiServer) -> Mesh {
        let mesh = Mesh::start(api).await;
        mesh.routes("catalog.shop", "catalog-v1", Duration::from_secs(10))
            .await;
        // Services, EndpointSlices, Pods, HTTPRoutes, GRPCRoutes, ReferenceGrants,
        // ResiliencePolicies, AuthorizationPolicies, MTLSPolicies and Namespaces.
        eventually("ten watches are open", Duration::from_secs(10), || async {
            (api.cluster.open_watches() == 10).then_some(())
        })
        .await;
        mesh
    }

    async fn body(&self, host: &str) -> Option<String> {
        self.client.get(host, "/").await.ok().map(|r| r.body)
    }

    /// Waits until `host` answers with `body`.
    async fn routes(&self, host: &str, body: &str, within: Duration) {
        eventually(&format!("{host} answers {body}"), within, || async {
            (self.body(host).await.as_deref() == Some(body)).then_some(())
        })
        .await;
    }

    async fn status(&self) -> Value {
        serde_json::from_str(&get(self.cp.admin_addr, "/status").await.body).unwrap()
    }
}

/// An API server holding `CLUSTER` and one EndpointSlice per `(service, endpoint)`.
async fn api_server(slices: &[(&str, SocketAddr)]) -> FakeApiServer {
    let api = FakeApiServer::empty("cp-token").await;
    for obj in typed(CLUSTER) {
        api.cluster.apply(obj);
    }
    for (service, endpoint) in slices {
        api.cluster.apply(slice(service, *endpoint));
    }
    api
}

/// Lists (not watches) made so far.
fn lists(api: &FakeApiServer) -> usize {
    api.cluster
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET ") && !r.contains("watch=true"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_services_reach_the_proxy_and_follow_their_endpoints() {
    let (catalog_v1, catalog_v2, ledger) = (
        upstreams::http("catalog-v1").await,
        upstreams::http("catalog-v2").await,
        upstreams::http("ledger").await,
    );
    let api = api_server(&[("catalog", catalog_v1.addr), ("ledger", ledger.addr)]).await;
    let mesh = Mesh::start(&api).await;

    // The file's service, with its endpoints from the cluster, by DNS name and by VIP.
    mesh.routes(
        "catalog.shop.svc.cluster.local",
        "catalog-v1",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        mesh.body("10.96.0.50:80").await.as_deref(),
        Some("catalog-v1")
    );
    // A service only the cluster knows.
    assert_eq!(mesh.body("ledger.shop").await.as_deref(), Some("ledger"));
    // Every TCP port is meshed; a host name without a port reaches port 80.
    let admin = upstreams::http("catalog-admin").await;
    api.cluster
        .apply(port_slice("catalog", "admin", admin.addr));
    mesh.routes(
        "catalog.shop:8080",
        "catalog-admin",
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        mesh.body("10.96.0.50:8080").await.as_deref(),
        Some("catalog-admin")
    );
    assert_eq!(
        mesh.body("catalog.shop:80").await.as_deref(),
        Some("catalog-v1")
    );
    assert_eq!(
        mesh.body("catalog.shop").await.as_deref(),
        Some("catalog-v1")
    );
    // The mesh file's policy and the pods' identity are both there.
    let snapshot = mesh.cp.publisher.current();
    let catalog = &snapshot.mesh.as_ref().unwrap().services["catalog.shop"];
    assert!(catalog.policy.retry.is_some());
    assert_eq!(
        catalog.identity.to_string(),
        "spiffe://cluster.local/ns/shop/sa/catalog-sa"
    );
    assert_eq!(
        catalog.endpoints.len(),
        1,
        "the not-ready endpoint is left out"
    );
    assert_eq!(mesh.status().await["cluster"]["synced"], true);

    // The API server fails and its watches drop: the last view keeps serving.
    api.cluster.fail(Some("etcd is down"));
    api.cluster.drop_watches();
    let version = mesh.cp.publisher.current().mesh_version;
    let status = eventually(
        "the failure shows on /status",
        Duration::from_secs(10),
        || async {
            let status = mesh.status().await;
            status["cluster"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("etcd is down"))
                .then_some(status)
        },
    )
    .await;
    // Each kind says for itself; whichever watch broke first is there.
    assert!(
        status["cluster"]["errors"]
            .as_object()
            .is_some_and(|e| !e.is_empty()),
        "{status}"
    );
    for _ in 0..5 {
        assert_eq!(
            mesh.body("catalog.shop").await.as_deref(),
            Some("catalog-v1")
        );
    }
    assert_eq!(mesh.cp.publisher.current().mesh_version, version);
    let metrics = get(mesh.cp.admin_addr, "/metrics").await.body;
    assert!(
        metric(&metrics, "outrigger_cp_cluster_watch_errors_total") >= 1,
        "{metrics}"
    );

    // It recovers, and the pod moves: the proxy follows.
    api.cluster.fail(None);
    api.cluster.apply(slice("catalog", catalog_v2.addr));
    mesh.routes("catalog.shop", "catalog-v2", Duration::from_secs(60))
        .await;
    let status = eventually("the error clears", Duration::from_secs(10), || async {
        let status = mesh.status().await;
        status["cluster"]["last_error"].is_null().then_some(status)
    })
    .await;
    // catalog (two ports) and ledger.
    assert_eq!(status["cluster"]["services"], 3);

    // A Service that goes away leaves the mesh.
    api.cluster.delete(&typed(CLUSTER)[1]);
    eventually(
        "ledger leaves the mesh",
        Duration::from_secs(10),
        || async { (mesh.status().await["cluster"]["services"] == 2).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_resume_after_a_drop_and_list_again_after_410_gone() {
    let (v1, v2, v3) = (
        upstreams::http("catalog-v1").await,
        upstreams::http("catalog-v2").await,
        upstreams::http("catalog-v3").await,
    );
    let api = api_server(&[("catalog", v1.addr)]).await;
    let mesh = Mesh::watching(&api).await;
    let listed = lists(&api);

    // Bookmarks and changes come over the open watches: no list.
    api.cluster.bookmark();
    api.cluster.apply(slice("catalog", v2.addr));
    mesh.routes("catalog.shop", "catalog-v2", Duration::from_secs(10))
        .await;
    assert_eq!(lists(&api), listed, "{:#?}", api.cluster.requests());

    // A dropped watch is resumed from where it was, and what happened meanwhile arrives.
    api.cluster.drop_watches();
    api.cluster.apply(slice("catalog", v3.addr));
    mesh.routes("catalog.shop", "catalog-v3", Duration::from_secs(10))
        .await;
    assert_eq!(lists(&api), listed, "a resumed watch needs no list");

    // The history is compacted while the watches are down (the API server refuses them
    // meanwhile): resumed, they get 410 Gone, and list again.
    api.cluster.fail(Some("restarting"));
    api.cluster.drop_watches();
    api.cluster.apply(slice("catalog", v1.addr));
    api.cluster.compact();
    api.cluster.fail(None);
    mesh.routes("catalog.shop", "catalog-v1", Duration::from_secs(10))
        .await;
    assert!(lists(&api) > listed, "{:#?}", api.cluster.requests());
    // What the control plane asked for, in the protocol's terms.
    let requests = api.cluster.requests();
    assert!(
        requests.iter().any(|r| r.contains("watch=true")
            && r.contains("allowWatchBookmarks=true")
            && r.contains("resourceVersion=")),
        "{requests:#?}"
    );
    assert!(
        requests.iter().any(|r| r.contains("limit=500")),
        "{requests:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_change_reaches_the_proxy_within_half_a_second() {
    let (v1, v2) = (
        upstreams::http("catalog-v1").await,
        upstreams::http("catalog-v2").await,
    );
    let api = api_server(&[("catalog", v1.addr)]).await;
    let mesh = Mesh::watching(&api).await;
    let moved = Instant::now();
    api.cluster.apply(slice("catalog", v2.addr));
    mesh.routes("catalog.shop", "catalog-v2", Duration::from_millis(500))
        .await;
    eprintln!(
        "the endpoint change reached the proxy in {:?}",
        moved.elapsed()
    );
}

/// The mode a node of `service` is told for its inbound side, if any.
fn inbound_mode(cp: &ControlPlane, service: &str) -> Option<TlsMode> {
    let view = cp.publisher.current().view_for(service);
    let any = view
        .select(
            "type.googleapis.com/envoy.config.listener.v3.Listener",
            &["inbound".into()],
        )
        .pop()?;
    let listener: Listener = outrigger_core::xds::decode(&any).unwrap();
    Some(read_inbound(&listener).unwrap().mode)
}

/// A Namespace's annotation sets the mode of its Services, a namespace-wide MTLSPolicy wins
/// over it, and a Service's own MTLSPolicy over that; each change reaches the Service's
/// inbound Listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_services_mtls_mode_comes_from_its_policy_its_namespaces_or_the_annotation() {
    let api = api_server(&[]).await;
    let namespace = typed(
        r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  annotations: {outrigger.io/inbound-tls: permissive}
"#,
    )
    .remove(0);
    api.cluster.apply(namespace.clone());
    let mesh = Mesh::start(&api).await;
    let cp = &mesh.cp;
    let mode_is = |want: Option<TlsMode>| {
        move || async move { (inbound_mode(cp, "ledger.shop") == want).then_some(()) }
    };
    eventually(
        "the annotation applies",
        Duration::from_secs(5),
        mode_is(Some(TlsMode::Permissive)),
    )
    .await;

    let all = typed(
        r#"
apiVersion: policy.outrigger.io/v1alpha1
kind: MTLSPolicy
metadata: {name: all, namespace: shop}
spec: {mode: Strict}
"#,
    )
    .remove(0);
    api.cluster.apply(all.clone());
    eventually(
        "the namespace's policy wins",
        Duration::from_secs(5),
        mode_is(Some(TlsMode::Strict)),
    )
    .await;

    let own = typed(
        r#"
apiVersion: policy.outrigger.io/v1alpha1
kind: MTLSPolicy
metadata: {name: ledger, namespace: shop}
spec:
  mode: Permissive
  targetRefs: [{group: "", kind: Service, name: ledger}]
"#,
    )
    .remove(0);
    api.cluster.apply(own.clone());
    eventually(
        "the Service's own policy wins",
        Duration::from_secs(5),
        mode_is(Some(TlsMode::Permissive)),
    )
    .await;
    assert_eq!(inbound_mode(cp, "catalog.shop"), Some(TlsMode::Strict));

    for gone in [&own, &all] {
        api.cluster.delete(gone);
    }
    let mut bare = namespace;
    bare["metadata"]["annotations"] = serde_json::json!({});
    api.cluster.apply(bare);
    eventually(
        "nothing is said any more",
        Duration::from_secs(5),
        mode_is(None),
    )
    .await;
}
