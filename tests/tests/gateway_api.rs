//! Gateway API for the mesh (GAMMA): HTTPRoutes attached to a Service, served by a fake
//! Kubernetes API server over the real list/watch protocol, reach a proxy through the control
//! plane, and route as the Gateway API defines: weighted backends, path and header matches,
//! 404 for a request no rule matches, timeouts and retries. A route using something this
//! version cannot honour is not applied, and its status says which field.

use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use outrigger_control_plane::app::ControlPlane;
use outrigger_control_plane::lease::Lease;
use outrigger_tests::clients::{Reply, TestClient, get};
use outrigger_tests::envoy::Envoy;
use outrigger_tests::fake_kube::FakeApiServer;
use outrigger_tests::kube::{assert_typed, yaml_documents};
use outrigger_tests::{TestProxy, eventually, free_addr, upstreams, xds_proxy};
use serde_json::Value;

/// The documents of `yaml`, each checked against its typed object.
fn typed(yaml: &str) -> Vec<Value> {
    let docs = yaml_documents(yaml);
    docs.iter().for_each(assert_typed);
    docs
}

/// A Service `name` in `shop` on port 80, and its EndpointSlice with one ready endpoint.
fn service(name: &str, endpoint: SocketAddr) -> Vec<Value> {
    typed(&format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: shop}}
spec:
  ports: [{{name: http, port: 80, protocol: TCP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name}-1
  namespace: shop
  labels: {{kubernetes.io/service-name: {name}}}
addressType: IPv4
ports: [{{name: http, port: {port}, protocol: TCP}}]
endpoints:
  - addresses: ["{ip}"]
"#,
        port = endpoint.port(),
        ip = endpoint.ip()
    ))
}

/// A control plane watching the API server, and a proxy following it: ours, or a real
/// Envoy.
struct Mesh {
    cp: ControlPlane,
    client: TestClient,
    outbound: SocketAddr,
    proxy: Option<TestProxy>,
    _envoy: Option<Envoy>,
}

impl Mesh {
    async fn start(api: &FakeApiServer) -> Mesh {
        Self::replica(api, "cp-a").await
    }

    /// The same, with a real Envoy as the proxy, listening where the mesh file says.
    async fn with_envoy(api: &FakeApiServer) -> Mesh {
        let outbound = free_addr();
        let cp = control_plane(api, "cp-a", outbound.port()).await;
        let envoy = Envoy::ads("envoy-gamma", "GRPC", cp.xds_addr, free_addr());
        Mesh {
            cp,
            client: TestClient::http1(outbound),
            outbound,
            proxy: None,
            _envoy: Some(envoy),
        }
    }

    /// A replica named `instance`, competing for the status writer's Lease.
    async fn replica(api: &FakeApiServer, instance: &str) -> Mesh {
        let cp = control_plane(api, instance, 15001).await;
        let (proxy, client) = xds_proxy(cp.xds_addr).await;
        Mesh {
            cp,
            client,
            outbound: proxy.addr("outbound"),
            proxy: Some(proxy),
            _envoy: None,
        }
    }

    /// Where the proxy (ours or Envoy) takes outbound calls.
    fn outbound(&self) -> SocketAddr {
        self.outbound
    }

    /// The whole reply to `method path` to `catalog`, with `headers`.
    async fn send(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.client
            .send(
                http::Method::from_bytes(method.as_bytes()).unwrap(),
                "catalog.shop.svc.cluster.local",
                path,
                headers,
                "",
            )
            .await
            .unwrap()
    }

    /// `(status, body)` of `GET path` to `catalog`, with `headers`.
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        match self
            .client
            .send(
                http::Method::GET,
                "catalog.shop.svc.cluster.local",
                path,
                headers,
                "",
            )
            .await
        {
            Ok(r) => (r.status.as_u16(), r.body),
            Err(e) => (0, e.to_string()),
        }
    }

    async fn status(&self) -> Value {
        serde_json::from_str(&get(self.cp.admin_addr, "/status").await.body).unwrap()
    }
}

/// A control plane watching `api` as replica `instance`; Envoy's listener on `outbound_port`.
async fn control_plane(api: &FakeApiServer, instance: &str, outbound_port: u16) -> ControlPlane {
    let cp = outrigger_tests::control_plane(&format!(
        "mesh: {{trust_domain: cluster.local, outbound_port: {outbound_port}}}\n"
    ))
    .await;
    let kube = api.client();
    let lease = Lease::new(
        kube.client.clone(),
        "outrigger",
        "outrigger-status-writer",
        instance,
        Duration::from_secs(15),
    );
    cp.watch_cluster(kube, Some(Arc::new(lease)));
    cp
}

/// The cluster: `catalog` (the parent, whose own pods are `catalog-v1`), `catalog-v1`,
/// `catalog-v2` and `flaky`, each a Service with its endpoint.
struct Cluster {
    api: FakeApiServer,
    _upstreams: Vec<upstreams::Upstream>,
    flaky: upstreams::Seen,
}

impl Cluster {
    async fn start() -> Cluster {
        let api = FakeApiServer::empty("cp-token").await;
        let (v1, v2) = (
            upstreams::http("catalog-v1").await,
            upstreams::http("catalog-v2").await,
        );
        let (flaky, seen) = upstreams::fail_first().await;
        for (name, addr) in [
            ("catalog", v1.addr),
            ("catalog-v1", v1.addr),
            ("catalog-v2", v2.addr),
            ("flaky", flaky.addr),
        ] {
            for obj in service(name, addr) {
                api.cluster.apply(obj);
            }
        }
        Cluster {
            api,
            _upstreams: vec![v1, v2, flaky],
            flaky: seen,
        }
    }

    fn route(&self, yaml: &str) {
        for obj in typed(yaml) {
            self.api.cluster.apply(obj);
        }
    }
}

const PARENT: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: catalog, namespace: shop, generation: 1}
spec:
  parentRefs: [{group: "", kind: Service, name: catalog, port: 80}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weighted_split_matches_and_a_404_for_what_no_rule_matches() {
    let cluster = Cluster::start().await;
    let mesh = Mesh::start(&cluster.api).await;
    split_matches_and_404(&cluster, &mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_follows_the_same_split_matches_and_404() {
    let cluster = Cluster::start().await;
    let mesh = Mesh::with_envoy(&cluster.api).await;
    split_matches_and_404(&cluster, &mesh).await;
}

async fn split_matches_and_404(cluster: &Cluster, mesh: &Mesh) {
    // Before any route: the Service's own endpoints.
    eventually("catalog is routed", Duration::from_secs(30), || async {
        (mesh.get("/", &[]).await == (200, "catalog-v1".into())).then_some(())
    })
    .await;

    cluster.route(&format!(
        r#"{PARENT}  rules:
    - matches: [{{path: {{type: Exact, value: /admin}}}}]
      backendRefs: [{{name: catalog-v2, port: 80}}]
    - matches:
        - path: {{type: PathPrefix, value: /api}}
          headers: [{{name: X-Canary, value: "yes"}}]
      backendRefs: [{{name: catalog-v2, port: 80}}]
    - matches: [{{path: {{type: PathPrefix, value: /api}}}}]
      backendRefs:
        - {{name: catalog-v1, port: 80, weight: 80}}
        - {{name: catalog-v2, port: 80, weight: 20}}
"#
    ));
    eventually("the route applies", Duration::from_secs(10), || async {
        (mesh.get("/admin", &[]).await == (200, "catalog-v2".into())).then_some(())
    })
    .await;
    // Exact is exact; the header match wins over the plain prefix; no rule, 404.
    assert_eq!(mesh.get("/admin/x", &[]).await.0, 404);
    assert_eq!(mesh.get("/other", &[]).await.0, 404);
    for _ in 0..20 {
        assert_eq!(
            mesh.get("/api/items", &[("x-canary", "yes")]).await,
            (200, "catalog-v2".into())
        );
    }
    // 80/20 within 5 points over 2,000 requests.
    let mut counts: HashMap<String, u32> = HashMap::new();
    for _ in 0..2000 {
        let (status, body) = mesh.get("/api/items", &[]).await;
        assert_eq!(status, 200, "{body}");
        *counts.entry(body).or_default() += 1;
    }
    let share = f64::from(counts["catalog-v2"]) / 2000.0 * 100.0;
    assert!((15.0..=25.0).contains(&share), "{counts:?}");

    // The status says it was accepted, with every reference resolved.
    let status = mesh.status().await;
    let outcome = &status["cluster"]["routes"]["shop/catalog"][0];
    assert_eq!(outcome["accepted"], true, "{status}");
    assert_eq!(outcome["resolved_refs"], true, "{status}");

    // The route goes away: the Service's own endpoints again.
    cluster.api.cluster.delete(&typed(PARENT)[0]);
    eventually("the route is gone", Duration::from_secs(10), || async {
        (mesh.get("/other", &[]).await == (200, "catalog-v1".into())).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_and_retries_come_from_the_route() {
    let cluster = Cluster::start().await;
    let mesh = Mesh::start(&cluster.api).await;
    timeouts_and_retries(&cluster, &mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_takes_the_same_timeouts_and_retries() {
    let cluster = Cluster::start().await;
    let mesh = Mesh::with_envoy(&cluster.api).await;
    timeouts_and_retries(&cluster, &mesh).await;
}

async fn timeouts_and_retries(cluster: &Cluster, mesh: &Mesh) {
    cluster.route(&format!(
        r#"{PARENT}  rules:
    - matches: [{{path: {{value: /slow}}}}]
      backendRefs: [{{name: catalog-v1, port: 80}}]
      timeouts: {{request: 200ms}}
    - matches: [{{path: {{value: /fail-once}}}}]
      backendRefs: [{{name: flaky, port: 80}}]
      retry: {{attempts: 2, codes: [503], backoff: 10ms}}
    - matches: [{{path: {{value: /always-503}}}}]
      backendRefs: [{{name: flaky, port: 80}}]
      retry: {{attempts: 0}}
"#
    ));
    // Before the route, catalog's own pods answer everything.
    eventually("the route applies", Duration::from_secs(30), || async {
        let (status, body) = mesh.get("/fail-once/probe", &[]).await;
        (status == 200 && body != "catalog-v1").then_some(())
    })
    .await;
    assert_eq!(mesh.get("/slow/3000", &[]).await.0, 504);
    assert_eq!(mesh.get("/fail-once/a", &[]).await.0, 200);
    assert_eq!(cluster.flaky.lock().unwrap()["/fail-once/a"], 2);
    // attempts: 0 turns off even the retries the mesh makes by default.
    assert_eq!(mesh.get("/always-503/b", &[]).await.0, 503);
    assert_eq!(cluster.flaky.lock().unwrap()["/always-503/b"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_with_what_the_mesh_cannot_honour_is_refused_by_name() {
    let cluster = Cluster::start().await;
    let mesh = Mesh::start(&cluster.api).await;
    cluster.route(&format!(
        r#"{PARENT}  rules:
    - filters: [{{type: CORS, cors: {{allowOrigins: ["*"]}}}}]
      backendRefs: [{{name: catalog-v2, port: 80}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: elsewhere, namespace: shop}}
spec:
  parentRefs: [{{group: "", kind: Service, name: catalog, port: 80}}]
  rules:
    - backendRefs: [{{name: nowhere, port: 80}}]
"#
    ));
    let status = eventually(
        "the outcome is on /status",
        Duration::from_secs(10),
        || async {
            let status = mesh.status().await;
            let routes = &status["cluster"]["routes"];
            (routes["shop/catalog"].is_array() && routes["shop/elsewhere"].is_array())
                .then_some(status)
        },
    )
    .await;
    let refused = &status["cluster"]["routes"]["shop/catalog"][0]["accepted"];
    assert_eq!(refused["reason"], "UnsupportedValue", "{status}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("spec.rules[0].filters[0] (CORS)"),
        "{status}"
    );
    let unresolved = &status["cluster"]["routes"]["shop/elsewhere"][0]["resolved_refs"];
    assert_eq!(unresolved["reason"], "BackendNotFound", "{status}");
    // Neither applies: the Service's own endpoints serve everything.
    eventually("catalog is routed", Duration::from_secs(10), || async {
        (mesh.get("/", &[]).await == (200, "catalog-v1".into())).then_some(())
    })
    .await;
    assert_eq!(mesh.get("/anything", &[]).await, (200, "catalog-v1".into()));
}

/// Status writes to `shop/catalog` so far.
fn status_writes(cluster: &Cluster) -> usize {
    cluster
        .api
        .cluster
        .requests()
        .iter()
        .filter(|r| r.starts_with("PATCH ") && r.contains("/httproutes/catalog/status"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_status_is_written_once_by_the_replica_holding_the_lease() {
    let cluster = Cluster::start().await;
    let (a, b) = (
        Mesh::replica(&cluster.api, "cp-a").await,
        Mesh::replica(&cluster.api, "cp-b").await,
    );
    // Another controller's entry is there already, and stays.
    let mut route = typed(&format!(
        r#"{PARENT}  rules:
    - backendRefs: [{{name: catalog-v2, port: 80}}]
status:
  parents:
    - parentRef: {{name: edge}}
      controllerName: example.com/gateway
      conditions: []
"#
    ))
    .remove(0);
    cluster.route(&route.to_string());
    let ours = |route: &Value| -> Vec<Value> {
        route["status"]["parents"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["controllerName"] == "outrigger.io/mesh")
            .cloned()
            .collect()
    };
    let written = eventually("the status is written", Duration::from_secs(10), || async {
        let now = cluster.api.cluster.get(&route)?;
        (!ours(&now).is_empty()).then_some(now)
    })
    .await;
    let entry = &ours(&written)[0];
    // Each check names the status it saw, so that a failure says which write it was.
    assert_eq!(entry["parentRef"]["name"], "catalog", "{written:#}");
    let conditions = entry["conditions"].as_array().unwrap();
    for (kind, reason) in [("Accepted", "Accepted"), ("ResolvedRefs", "ResolvedRefs")] {
        let c = conditions.iter().find(|c| c["type"] == kind).unwrap();
        assert_eq!(
            (c["status"].as_str(), c["reason"].as_str()),
            (Some("True"), Some(reason)),
            "{written:#}"
        );
        assert_eq!(c["observedGeneration"], 1, "{written:#}");
    }
    assert_eq!(
        written["status"]["parents"][0]["controllerName"], "example.com/gateway",
        "{written:#}"
    );
    assert_eq!(ours(&written).len(), 1, "{written:#}");

    // Both replicas serve the route; one wrote, once, and an unchanged cluster costs no write.
    for mesh in [&a, &b] {
        eventually("the route applies", Duration::from_secs(10), || async {
            (mesh.get("/", &[]).await == (200, "catalog-v2".into())).then_some(())
        })
        .await;
    }
    assert_eq!(
        status_writes(&cluster),
        1,
        "{:#?}",
        cluster.api.cluster.requests()
    );
    let holder = cluster
        .api
        .cluster
        .get(
            &serde_json::json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"namespace": "outrigger", "name": "outrigger-status-writer"}}),
        )
        .unwrap();
    let holder = holder["spec"]["holderIdentity"].as_str().unwrap();
    assert!(["cp-a", "cp-b"].contains(&holder), "{holder}");

    // The route changes to one the mesh refuses: the status follows, naming the field.
    route["spec"]["rules"][0]["filters"] = serde_json::json!([{"type": "CORS", "cors": {}}]);
    route["metadata"]["generation"] = serde_json::json!(2);
    cluster.route(&route.to_string());
    let refused = eventually(
        "the refusal is written",
        Duration::from_secs(10),
        || async {
            let now = cluster.api.cluster.get(&route)?;
            let entry = ours(&now).into_iter().next()?;
            let accepted = entry["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Accepted")?
                .clone();
            (accepted["status"] == "False").then_some(accepted)
        },
    )
    .await;
    assert_eq!(refused["reason"], "UnsupportedValue");
    assert_eq!(refused["observedGeneration"], 2);
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("filters[0] (CORS)"),
        "{refused}"
    );
    assert_eq!(status_writes(&cluster), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_query_parameters_regexes_and_header_changes() {
    let cluster = Cluster::start().await;
    let mesh = Mesh::start(&cluster.api).await;
    methods_queries_and_headers(&cluster, &mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_takes_the_same_methods_query_parameters_and_header_changes() {
    let cluster = Cluster::start().await;
    let mesh = Mesh::with_envoy(&cluster.api).await;
    methods_queries_and_headers(&cluster, &mesh).await;
}

async fn methods_queries_and_headers(cluster: &Cluster, mesh: &Mesh) {
    cluster.route(&format!(
        r#"{PARENT}  rules:
    - matches: [{{path: {{value: /api}}, method: POST}}]
      backendRefs: [{{name: catalog-v2, port: 80}}]
    - matches: [{{path: {{value: /api}}, queryParams: [{{name: version, value: "2"}}]}}]
      backendRefs: [{{name: catalog-v2, port: 80}}]
    - matches:
        - path: {{value: /api}}
          headers: [{{type: RegularExpression, name: x-user, value: "tester-[0-9]+"}}]
      backendRefs: [{{name: catalog-v2, port: 80}}]
    - matches: [{{path: {{value: /api/}}}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{{name: X-Env, value: prod}}]
            add: [{{name: x-tag, value: added}}]
            remove: [x-secret]
        - type: ResponseHeaderModifier
          responseHeaderModifier:
            set: [{{name: x-served-by, value: mesh}}]
      backendRefs: [{{name: catalog-v1, port: 80}}]
"#
    ));
    eventually("the route applies", Duration::from_secs(30), || async {
        (mesh.get("/api?version=2", &[]).await == (200, "catalog-v2".into())).then_some(())
    })
    .await;
    let body = |r: Reply| (r.status.as_u16(), r.body);
    assert_eq!(body(mesh.send("POST", "/api/x", &[]).await).0, 200);
    assert_eq!(
        mesh.send("POST", "/api/x", &[]).await.header("x-upstream"),
        Some("catalog-v2")
    );
    assert_eq!(mesh.get("/api/x?a=1&version=2", &[]).await.1, "catalog-v2");
    assert_eq!(mesh.get("/api/x?version=3", &[]).await.1, "catalog-v1");
    assert_eq!(
        mesh.get("/api", &[("x-user", "tester-42")]).await.1,
        "catalog-v2"
    );
    assert_eq!(
        mesh.get("/api", &[("x-user", "tester-x")]).await.1,
        "catalog-v1"
    );
    // PathPrefix matches whole path segments.
    assert_eq!(mesh.get("/apix", &[]).await.0, 404);

    let reply = mesh
        .send(
            "GET",
            "/api/items",
            &[("x-env", "dev"), ("x-tag", "mine"), ("x-secret", "s3cret")],
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-echo-x-env"), Some("prod"));
    let tags: Vec<&str> = reply
        .headers
        .get_all("x-echo-x-tag")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert!(
        tags.contains(&"mine") && tags.contains(&"added"),
        "{tags:?}"
    );
    assert_eq!(reply.header("x-echo-x-secret"), None);
    assert_eq!(reply.header("x-served-by"), Some("mesh"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_and_rewrites() {
    let cluster = Cluster::start().await;
    let mesh = Mesh::start(&cluster.api).await;
    redirects_and_rewrites_through(&cluster, &mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_takes_the_same_redirects_and_rewrites() {
    let cluster = Cluster::start().await;
    let mesh = Mesh::with_envoy(&cluster.api).await;
    redirects_and_rewrites_through(&cluster, &mesh).await;
}

async fn redirects_and_rewrites_through(cluster: &Cluster, mesh: &Mesh) {
    cluster.route(&format!(
        r#"{PARENT}  rules:
    - matches: [{{path: {{type: Exact, value: /old}}}}]
      filters:
        - type: RequestRedirect
          requestRedirect: {{path: {{type: ReplaceFullPath, replaceFullPath: /new}}, statusCode: 301}}
    - matches: [{{path: {{value: /moved}}}}]
      filters:
        - type: RequestRedirect
          requestRedirect:
            hostname: elsewhere.example
            path: {{type: ReplacePrefixMatch, replacePrefixMatch: /here}}
            statusCode: 308
    - matches: [{{path: {{type: Exact, value: /secure}}}}]
      filters:
        - type: RequestRedirect
          requestRedirect: {{scheme: https, port: 8443}}
    - matches: [{{path: {{value: /v1}}}}]
      filters:
        - type: URLRewrite
          urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}}
      backendRefs: [{{name: catalog-v2, port: 80}}]
    - matches: [{{path: {{value: /strip}}}}]
      filters:
        - type: URLRewrite
          urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /}}}}
      backendRefs: [{{name: catalog-v2, port: 80}}]
    - matches: [{{path: {{value: /whole}}}}]
      filters:
        - type: URLRewrite
          urlRewrite: {{hostname: internal.example, path: {{type: ReplaceFullPath, replaceFullPath: /all}}}}
      backendRefs: [{{name: catalog-v2, port: 80}}]
"#
    ));
    eventually("the route applies", Duration::from_secs(30), || async {
        (mesh.get("/old", &[]).await.0 == 301).then_some(())
    })
    .await;
    let redirect = |path: &'static str| async move {
        let r = mesh.send("GET", path, &[]).await;
        (
            r.status.as_u16(),
            r.header("location").unwrap_or_default().to_string(),
        )
    };
    let host = "catalog.shop.svc.cluster.local";
    assert_eq!(redirect("/old").await, (301, format!("http://{host}/new")));
    assert_eq!(
        redirect("/moved/a?x=1").await,
        (308, "http://elsewhere.example/here/a?x=1".to_string())
    );
    assert_eq!(
        redirect("/secure").await,
        (302, format!("https://{host}:8443/secure"))
    );
    // Rewrites: what the backend sees.
    let seen = |path: &'static str| async move {
        let r = mesh.send("GET", path, &[]).await;
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        (
            r.header("x-path").unwrap_or_default().to_string(),
            r.header("x-echo-host").unwrap_or_default().to_string(),
        )
    };
    assert_eq!(seen("/v1/items?q=1").await.0, "/v2/items?q=1");
    assert_eq!(seen("/v1").await.0, "/v2");
    assert_eq!(seen("/strip/a").await.0, "/a");
    assert_eq!(seen("/strip").await.0, "/");
    assert_eq!(
        seen("/whole/x?y=2").await,
        ("/all?y=2".to_string(), "internal.example".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_sees_the_request_and_its_answer_is_ignored() {
    let cluster = Cluster::start().await;
    let mesh = Mesh::start(&cluster.api).await;
    mirrored(&cluster, &mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_mirrors_the_same_way() {
    let cluster = Cluster::start().await;
    let mesh = Mesh::with_envoy(&cluster.api).await;
    mirrored(&cluster, &mesh).await;
}

async fn mirrored(cluster: &Cluster, mesh: &Mesh) {
    cluster.route(&format!(
        r#"{PARENT}  rules:
    - filters:
        - type: RequestMirror
          requestMirror: {{backendRef: {{name: flaky, port: 80}}}}
      backendRefs: [{{name: catalog-v2, port: 80}}]
"#
    ));
    eventually("the route applies", Duration::from_secs(30), || async {
        (mesh.get("/x", &[]).await == (200, "catalog-v2".into())).then_some(())
    })
    .await;
    // The mirror answers 503 to this path; the caller still gets the backend's answer.
    assert_eq!(
        mesh.get("/always-503/m", &[]).await,
        (200, "catalog-v2".into())
    );
    eventually(
        "the mirror sees the request",
        Duration::from_secs(10),
        || async { (cluster.flaky.lock().unwrap().get("/always-503/m") == Some(&1)).then_some(()) },
    )
    .await;
    // A request with a body: the backend gets it whole (it echoes it), and so does the mirror.
    let reply = mesh
        .client
        .send(
            http::Method::POST,
            "catalog.shop.svc.cluster.local",
            "/always-503/posted",
            &[],
            "a body",
        )
        .await
        .unwrap();
    assert_eq!(
        (reply.status.as_u16(), reply.body.as_str()),
        (200, "a body")
    );
    eventually(
        "the mirror sees the POST",
        Duration::from_secs(10),
        || async {
            (cluster.flaky.lock().unwrap().get("/always-503/posted") == Some(&1)).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_routes_split_by_weight_match_methods_and_change_headers() {
    let cluster = Cluster::start().await;
    let mesh = Mesh::start(&cluster.api).await;
    grpc_routes(&cluster, &mesh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_takes_the_same_grpc_routes() {
    let cluster = Cluster::start().await;
    let mesh = Mesh::with_envoy(&cluster.api).await;
    grpc_routes(&cluster, &mesh).await;
}

async fn grpc_routes(cluster: &Cluster, mesh: &Mesh) {
    cluster.route(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: catalog-grpc, namespace: shop, generation: 1}
spec:
  parentRefs: [{group: "", kind: Service, name: catalog, port: 80}]
  rules:
    - matches: [{method: {service: shop.Catalog, method: Admin}}]
      backendRefs: [{name: catalog-v2, port: 80}]
    - matches: [{method: {service: shop.Catalog}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier: {set: [{name: x-via, value: grpcroute}]}
      backendRefs:
        - {name: catalog-v1, port: 80, weight: 50}
        - {name: catalog-v2, port: 80, weight: 50}
"#,
    );
    // gRPC calls, over HTTP/2 as a gRPC client makes them, once the proxy listens (Envoy's
    // listener comes from the control plane).
    eventually("the proxy listens", Duration::from_secs(30), || async {
        tokio::net::TcpStream::connect(mesh.outbound()).await.ok()
    })
    .await;
    let client = TestClient::http2(mesh.outbound()).await;
    let call = |method: &'static str| {
        let client = client.clone();
        async move {
            client
                .send(
                    http::Method::POST,
                    "catalog.shop.svc.cluster.local",
                    method,
                    &[("content-type", "application/grpc"), ("te", "trailers")],
                    "",
                )
                .await
                .unwrap()
        }
    };
    eventually("the route applies", Duration::from_secs(30), || async {
        (call("/shop.Catalog/Admin").await.header("x-upstream") == Some("catalog-v2")).then_some(())
    })
    .await;
    for _ in 0..10 {
        assert_eq!(
            call("/shop.Catalog/Admin").await.header("x-upstream"),
            Some("catalog-v2")
        );
    }
    let mut v2 = 0;
    for _ in 0..400 {
        let reply = call("/shop.Catalog/Get").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-echo-x-via"), Some("grpcroute"));
        v2 += u32::from(reply.header("x-upstream") == Some("catalog-v2"));
    }
    assert!((160..=240).contains(&v2), "{v2} of 400 to catalog-v2");
    // No rule for another service: 404, or as Envoy answers a gRPC call, UNIMPLEMENTED (a
    // gRPC client reads a 404 as UNIMPLEMENTED too).
    let unrouted = call("/other.Svc/Get").await;
    assert!(
        unrouted.status == 404 || unrouted.header("grpc-status") == Some("12"),
        "{} {:?}",
        unrouted.status,
        unrouted.headers
    );
    let status = mesh.status().await;
    assert_eq!(
        status["cluster"]["grpc_routes"]["shop/catalog-grpc"][0]["accepted"], true,
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resilience_policy_attached_to_a_service_applies_and_a_bad_one_is_refused_by_field() {
    let cluster = Cluster::start().await;
    let mesh = Mesh::start(&cluster.api).await;
    eventually("catalog is routed", Duration::from_secs(10), || async {
        (mesh.get("/", &[]).await.0 == 200).then_some(())
    })
    .await;
    let policy = typed(
        r#"
apiVersion: policy.outrigger.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: catalog-limits, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: catalog}]
  rateLimit: {requestsPerSecond: 0.5, burst: 2}
  retryBudget: {percent: 20, minRetries: 5}
  outlier: {consecutive5xx: 3}
"#,
    )
    .remove(0);
    cluster.api.cluster.apply(policy.clone());
    // Two in the burst, then 429 until the bucket refills.
    eventually(
        "the rate limit applies",
        Duration::from_secs(10),
        || async {
            let mut statuses = Vec::new();
            for _ in 0..3 {
                statuses.push(mesh.get("/", &[]).await.0);
            }
            statuses.contains(&429).then_some(())
        },
    )
    .await;
    let status = mesh.status().await;
    assert_eq!(
        status["cluster"]["resilience_policies"]["shop/catalog-limits"], true,
        "{status}"
    );

    // A second policy on the same Service conflicts; one with a typo is refused by field.
    cluster.route(
        r#"
apiVersion: policy.outrigger.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: zz-second, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: catalog}]
  rateLimit: {requestsPerSecond: 1000}
---
apiVersion: policy.outrigger.io/v1alpha1
kind: ResiliencePolicy
metadata: {name: typo, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: catalog-v2}]
  retry: {atempts: 3}
"#,
    );
    let status = eventually("both are refused", Duration::from_secs(10), || async {
        let status = mesh.status().await;
        let policies = &status["cluster"]["resilience_policies"];
        (policies["shop/typo"]["error"].is_string()
            && policies["shop/zz-second"]["error"].is_string())
        .then_some(status)
    })
    .await;
    let policies = &status["cluster"]["resilience_policies"];
    assert!(
        policies["shop/typo"]["error"]
            .as_str()
            .unwrap()
            .contains("atempts"),
        "{status}"
    );
    assert!(
        policies["shop/zz-second"]["error"]
            .as_str()
            .unwrap()
            .contains("already takes"),
        "{status}"
    );
    // Each policy's own status says the same, for each Service it targets (GEP-713).
    let condition = |name: &'static str| {
        let mut named = policy.clone();
        named["metadata"]["name"] = serde_json::json!(name);
        let cluster = &cluster;
        async move {
            let now = cluster.api.cluster.get(&named)?;
            let ancestor = now["status"]["ancestors"]
                .as_array()?
                .iter()
                .find(|a| a["controllerName"] == "outrigger.io/mesh")?
                .clone();
            Some(ancestor["conditions"][0]["reason"].as_str()?.to_string())
        }
    };
    for (name, reason) in [
        ("catalog-limits", "Accepted"),
        ("zz-second", "Conflicted"),
        ("typo", "Invalid"),
    ] {
        eventually(
            &format!("{name}'s status says {reason}"),
            Duration::from_secs(10),
            || async { (condition(name).await.as_deref() == Some(reason)).then_some(()) },
        )
        .await;
    }

    // Removed, the limit goes with it.
    cluster.api.cluster.delete(&policy);
    eventually("the limit is gone", Duration::from_secs(10), || async {
        let mut statuses = Vec::new();
        for _ in 0..5 {
            statuses.push(mesh.get("/", &[]).await.0);
        }
        statuses.iter().all(|s| *s == 200).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_route_applies_to_its_namespace_s_callers_only() {
    let cluster = Cluster::start().await;
    // The caller `web` lives in namespace `web`.
    cluster.route(
        r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: web}
spec:
  ports: [{name: http, port: 80, protocol: TCP}]
"#,
    );
    let mesh = Mesh::start(&cluster.api).await;
    let (_other_proxy, other) = {
        let proxy = TestProxy::start(&outrigger_tests::xds_config(&format!(
            "address: \"{}\"\nnode: other-1\nservice: nobody",
            mesh.cp.xds_addr
        )))
        .await;
        let client = TestClient::http1(proxy.addr("outbound"));
        (proxy, client)
    };
    cluster.route(&format!(
        r#"{PARENT}  rules:
    - backendRefs: [{{name: catalog-v2, port: 80}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: catalog-for-web, namespace: web}}
spec:
  parentRefs: [{{group: "", kind: Service, name: catalog, namespace: shop, port: 80}}]
  rules:
    - filters:
        - type: ResponseHeaderModifier
          responseHeaderModifier: {{set: [{{name: x-consumer, value: web}}]}}
      backendRefs: [{{name: catalog, namespace: shop, port: 80}}]
"#
    ));
    // web's callers take their own route (catalog's own pods, marked); others the producer's.
    eventually(
        "web's consumer route applies",
        Duration::from_secs(10),
        || async {
            let r = mesh.send("GET", "/", &[]).await;
            (r.body == "catalog-v1" && r.header("x-consumer") == Some("web")).then_some(())
        },
    )
    .await;
    eventually(
        "others take the producer route",
        Duration::from_secs(10),
        || async {
            let r = other
                .get("catalog.shop.svc.cluster.local", "/")
                .await
                .ok()?;
            (r.body == "catalog-v2" && r.header("x-consumer").is_none()).then_some(())
        },
    )
    .await;
    let status = mesh.status().await;
    assert_eq!(
        status["cluster"]["routes"]["web/catalog-for-web"][0]["accepted"], true,
        "{status}"
    );
    // A proxyless gRPC client asks for the service's own table, `catalog.shop`: as a node
    // of web it gets the consumer route, as any other node the producer's.
    let table_for = |node: &str| {
        let view = mesh.cp.publisher.current().view_for(node);
        let any = view
            .select(
                "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
                &["catalog.shop".into()],
            )
            .pop()
            .expect("the table is served");
        let table: RouteConfiguration = outrigger_core::xds::decode(&any).unwrap();
        assert_eq!(table.name, "catalog.shop");
        format!("{table:?}")
    };
    assert!(table_for("web.web").contains("x-consumer"));
    assert!(!table_for("nobody").contains("x-consumer"));
    assert!(table_for("nobody").contains("catalog-v2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_that_does_not_fit_its_type_is_refused_alone() {
    let cluster = Cluster::start().await;
    let mesh = Mesh::start(&cluster.api).await;
    // What an API server without the CRD's validation could hand over: a weight in words.
    cluster.api.cluster.apply(serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "broken", "namespace": "shop"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "catalog-v1", "port": 80}],
            "rules": [{"backendRefs": [{"name": "catalog-v2", "port": 80, "weight": "heavy"}]}],
        },
    }));
    cluster.route(&format!(
        r#"{PARENT}  rules:
    - backendRefs: [{{name: catalog-v2, port: 80}}]
"#
    ));
    // The good route applies; the broken one is refused by itself, saying why.
    eventually(
        "the good route applies",
        Duration::from_secs(10),
        || async { (mesh.get("/", &[]).await == (200, "catalog-v2".into())).then_some(()) },
    )
    .await;
    let status = mesh.status().await;
    let broken = &status["cluster"]["routes"]["shop/broken"][0]["accepted"];
    assert_eq!(broken["reason"], "UnsupportedValue", "{status}");
    assert!(
        broken["message"].as_str().unwrap().contains("invalid type"),
        "{status}"
    );
    assert!(
        status["cluster"]["errors"].as_object().unwrap().is_empty(),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_rule_names_its_routes() {
    let cluster = Cluster::start().await;
    let mesh = Mesh::start(&cluster.api).await;
    cluster.route(&format!(
        r#"{PARENT}  rules:
    - name: canary
      matches: [{{path: {{value: /canary}}}}]
      backendRefs: [{{name: catalog-v2, port: 80}}]
    - backendRefs: [{{name: catalog-v1, port: 80}}]
"#
    ));
    eventually("the route applies", Duration::from_secs(10), || async {
        (mesh.get("/canary", &[]).await == (200, "catalog-v2".into())).then_some(())
    })
    .await;
    mesh.get("/other", &[]).await;
    // The rule's name is the route's, in the proxy's metrics; an unnamed rule is numbered.
    let admin = mesh.proxy.as_ref().unwrap().admin();
    let metrics = get(admin, "/metrics").await.body;
    assert!(
        metrics.contains("route=\"shop/catalog/canary\""),
        "{metrics}"
    );
    assert!(metrics.contains("route=\"shop/catalog/1\""), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_in_another_namespace_needs_that_namespace_s_reference_grant() {
    let cluster = Cluster::start().await;
    let vault = upstreams::http("vault").await;
    for mut obj in service("vault", vault.addr) {
        obj["metadata"]["namespace"] = serde_json::json!("other");
        cluster.api.cluster.apply(obj);
    }
    let mesh = Mesh::start(&cluster.api).await;
    cluster.route(&format!(
        r#"{PARENT}  rules:
    - backendRefs: [{{name: vault, namespace: other, port: 80}}]
"#
    ));
    let refused = || async {
        let status = mesh.status().await;
        status["cluster"]["routes"]["shop/catalog"][0]["resolved_refs"]["reason"]
            .as_str()
            .map(str::to_string)
    };
    eventually(
        "refused without a grant",
        Duration::from_secs(10),
        || async { (refused().await.as_deref() == Some("RefNotPermitted")).then_some(()) },
    )
    .await;
    // A grant for another kind, or from another namespace, does not count.
    let grant = |from_ns: &str, kind: &str| {
        typed(&format!(
            r#"
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {{name: from-{from_ns}-{kind}, namespace: other}}
spec:
  from: [{{group: gateway.networking.k8s.io, kind: {kind}, namespace: {from_ns}}}]
  to: [{{group: "", kind: Service}}]
"#
        ))
        .remove(0)
    };
    cluster.api.cluster.apply(grant("web", "HTTPRoute"));
    cluster.api.cluster.apply(grant("shop", "GRPCRoute"));
    eventually("still refused", Duration::from_secs(10), || async {
        (mesh.status().await["cluster"]["routes"]["shop/catalog"][0]["resolved_refs"]["reason"]
            == "RefNotPermitted")
            .then_some(())
    })
    .await;
    // Not applied: catalog's own pods answer.
    eventually(
        "catalog's own pods answer",
        Duration::from_secs(10),
        || async { (mesh.get("/", &[]).await == (200, "catalog-v1".into())).then_some(()) },
    )
    .await;
    // The grant `other` gives HTTPRoutes from `shop`: the route applies.
    let good = grant("shop", "HTTPRoute");
    cluster.api.cluster.apply(good.clone());
    eventually("the route applies", Duration::from_secs(10), || async {
        (mesh.get("/", &[]).await == (200, "vault".into())).then_some(())
    })
    .await;
    assert_eq!(
        mesh.status().await["cluster"]["routes"]["shop/catalog"][0]["resolved_refs"],
        true
    );
    // Withdrawn, it no longer holds.
    cluster.api.cluster.delete(&good);
    eventually("refused again", Duration::from_secs(10), || async {
        (refused().await.as_deref() == Some("RefNotPermitted")).then_some(())
    })
    .await;
}

/// AuthorizationPolicies and MTLSPolicies get their `status.ancestors` from the Lease holder
/// as ResiliencePolicies do: a namespace-wide MTLSPolicy names its Namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_policies_get_their_status() {
    let cluster = Cluster::start().await;
    let mesh = Mesh::start(&cluster.api).await;
    let docs = typed(
        r#"
apiVersion: policy.outrigger.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: callers, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: catalog}]
  allow: [{from: [{serviceAccount: web}], methods: [GET]}]
---
apiVersion: policy.outrigger.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: lowercase, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: catalog}]
  allow: [{methods: [get]}]
---
apiVersion: policy.outrigger.io/v1alpha1
kind: MTLSPolicy
metadata: {name: strict, namespace: shop}
spec: {mode: Strict}
"#,
    );
    for d in &docs {
        cluster.api.cluster.apply(d.clone());
    }
    let ours = |doc: &Value| {
        let now = cluster.api.cluster.get(doc)?;
        now["status"]["ancestors"]
            .as_array()?
            .iter()
            .find(|a| a["controllerName"] == "outrigger.io/mesh")
            .cloned()
    };
    for (doc, reason, kind) in [
        (&docs[0], "Accepted", "Service"),
        (&docs[1], "Invalid", "Service"),
        (&docs[2], "Accepted", "Namespace"),
    ] {
        let ancestor = eventually(
            &format!("{}'s status says {reason}", doc["metadata"]["name"]),
            Duration::from_secs(10),
            || async { ours(doc).filter(|a| a["conditions"][0]["reason"] == reason) },
        )
        .await;
        assert_eq!(ancestor["ancestorRef"]["kind"], kind, "{ancestor}");
    }
    let status = mesh.status().await;
    assert_eq!(
        status["cluster"]["authorization_policies"]["shop/callers"],
        true
    );
    assert!(
        status["cluster"]["authorization_policies"]["shop/lowercase"]["error"]
            .as_str()
            .unwrap()
            .contains("methods[0]"),
        "{status}"
    );
    assert_eq!(status["cluster"]["mtls_policies"]["shop/strict"], true);
}
