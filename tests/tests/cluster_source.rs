//! Services from the cluster: a Kubernetes API server (fake, over real TLS) lists Services,
//! EndpointSlices and Pods; the control plane folds them into the mesh file, and a proxy on
//! xDS routes by the Service's DNS names and VIP to the ready endpoints, following them as
//! they move, and keeps serving while the API server fails.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outrigger_control_plane::app;
use outrigger_control_plane::kube_api::KubeApi;
use outrigger_tests::clients::{TestClient, get};
use outrigger_tests::fake_kube::FakeApiServer;
use outrigger_tests::{TestProxy, eventually, metric, temp_path, upstreams};
use serde_json::{Value, json};

/// The cluster as the API server lists it: `catalog` (also in the mesh file, with a retry
/// policy but no endpoints) and `ledger` (only in the cluster).
struct Cluster {
    catalog_endpoint: SocketAddr,
    ledger_endpoint: SocketAddr,
    failing: bool,
    /// Requests answered with an error.
    failed: u32,
}

fn slice(service: &str, endpoint: SocketAddr, extra_not_ready: &str) -> Value {
    json!({"metadata": {"name": format!("{service}-x1"), "namespace": "shop",
                        "labels": {"kubernetes.io/service-name": service}},
           "addressType": "IPv4",
           "ports": [{"name": "http", "port": endpoint.port(), "protocol": "TCP"}],
           "endpoints": [
               {"addresses": [endpoint.ip().to_string()], "conditions": {"ready": true},
                "targetRef": {"kind": "Pod", "name": format!("{service}-1"), "namespace": "shop"}},
               {"addresses": [extra_not_ready], "conditions": {"ready": false}}]})
}

fn answer(cluster: &mut Cluster, path: &str) -> (u16, Value) {
    if cluster.failing {
        cluster.failed += 1;
        return (500, json!({"kind": "Status", "message": "etcd is down"}));
    }
    match path {
        "/api/v1/services" => (
            200,
            json!({"kind": "ServiceList", "apiVersion": "v1", "items": [
            {"metadata": {"name": "catalog", "namespace": "shop"},
             "spec": {"clusterIP": "10.96.0.50", "clusterIPs": ["10.96.0.50"],
                      "ports": [{"name": "http", "port": 80, "targetPort": 9090, "protocol": "TCP"}]}},
            {"metadata": {"name": "ledger", "namespace": "shop"},
             "spec": {"clusterIP": "10.96.0.51",
                      "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}]}),
        ),
        "/apis/discovery.k8s.io/v1/endpointslices" => (
            200,
            json!({"kind": "EndpointSliceList", "items": [
            slice("catalog", cluster.catalog_endpoint, "127.0.0.9"),
            slice("ledger", cluster.ledger_endpoint, "127.0.0.9")]}),
        ),
        "/api/v1/pods" => (
            200,
            json!({"kind": "PodList", "items": [
            {"metadata": {"name": "catalog-1", "namespace": "shop"},
             "spec": {"serviceAccountName": "catalog-sa"}}]}),
        ),
        _ => (404, json!({"kind": "Status", "code": 404})),
    }
}

const MESH: &str = r#"services:
  - name: catalog
    namespace: shop
    policy:
      retry: {attempts: 2, on: [gateway-error]}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_services_reach_the_proxy_and_follow_their_endpoints() {
    let (catalog_v1, catalog_v2, ledger) = (
        upstreams::http("catalog-v1").await,
        upstreams::http("catalog-v2").await,
        upstreams::http("ledger").await,
    );
    let cluster = Arc::new(Mutex::new(Cluster {
        catalog_endpoint: catalog_v1.addr,
        ledger_endpoint: ledger.addr,
        failing: false,
        failed: 0,
    }));
    let api = {
        let cluster = cluster.clone();
        FakeApiServer::start(
            "cp-token",
            Arc::new(move |_: &str, path: &str, _: Value| {
                answer(&mut cluster.lock().unwrap(), path)
            }),
        )
        .await
    };
    let mesh = temp_path("mesh.yaml");
    std::fs::write(&mesh, MESH).unwrap();
    let cp = app::start(app::Options {
        mesh_path: mesh,
        xds_address: "127.0.0.1:0".parse().unwrap(),
        admin_address: "127.0.0.1:0".parse().unwrap(),
        identity: Default::default(),
    })
    .await
    .unwrap();
    let kube = KubeApi::new(&api.url(), "cp-token".into(), api.ca_pem.as_bytes()).unwrap();
    cp.watch_cluster(Arc::new(kube), Duration::from_millis(100));

    let proxy = TestProxy::start(&format!(
        r#"admin:
  address: 127.0.0.1:0
xds:
  address: "{}"
  node: web-1
  service: web
listeners:
  - name: outbound
    address: 127.0.0.1:0
    direction: outbound
    rds: outbound
"#,
        cp.xds_addr
    ))
    .await;
    let client = TestClient::http1(proxy.addr("outbound"));
    let body_for = |host: &'static str| {
        let client = client.clone();
        async move { client.get(host, "/").await.ok().map(|r| r.body) }
    };
    // The file's service, with its endpoints from the cluster, by DNS name and by VIP.
    eventually(
        "catalog routes to its ready endpoint",
        Duration::from_secs(10),
        || async {
            (body_for("catalog.shop.svc.cluster.local").await.as_deref() == Some("catalog-v1"))
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        body_for("10.96.0.50:80").await.as_deref(),
        Some("catalog-v1")
    );
    // A service only the cluster knows.
    assert_eq!(body_for("ledger.shop").await.as_deref(), Some("ledger"));
    // The mesh file's policy and the pods' identity are both there.
    let snapshot = cp.publisher.current();
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

    // The API server fails: the last view keeps serving.
    cluster.lock().unwrap().failing = true;
    let version = cp.publisher.current().mesh_version;
    eventually(
        "the control plane lists a failing API server",
        Duration::from_secs(10),
        || async { (cluster.lock().unwrap().failed >= 6).then_some(()) },
    )
    .await;
    for _ in 0..5 {
        assert_eq!(
            body_for("catalog.shop").await.as_deref(),
            Some("catalog-v1")
        );
    }
    assert_eq!(cp.publisher.current().mesh_version, version);
    // The failure is visible: in /status with the API server's words, and in a metric.
    let status = get(cp.admin_addr, "/status").await.body;
    assert!(status.contains("etcd is down"), "{status}");
    let metrics = get(cp.admin_addr, "/metrics").await.body;
    assert!(
        metric(&metrics, "outrigger_cp_cluster_list_failures_total") >= 2,
        "{metrics}"
    );

    // The pod moves: the proxy follows.
    {
        let mut c = cluster.lock().unwrap();
        c.failing = false;
        c.catalog_endpoint = catalog_v2.addr;
    }
    eventually(
        "catalog follows its endpoint",
        Duration::from_secs(10),
        || async {
            (body_for("catalog.shop").await.as_deref() == Some("catalog-v2")).then_some(())
        },
    )
    .await;
    let status: Value = serde_json::from_str(&get(cp.admin_addr, "/status").await.body).unwrap();
    assert_eq!(status["cluster"]["last_error"], Value::Null);
    assert_eq!(status["cluster"]["services"], 2);
}
