//! A real Envoy 1.40, given only a bootstrap that points at our control plane over ADS
//! (state of the world), routes as the mesh file says and follows it when it changes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use outrigger_control_plane::app::{self, ControlPlane};
use outrigger_tests::clients::{TestClient, get};
use outrigger_tests::envoy::Envoy;
use outrigger_tests::{eventually, free_addr, temp_path, upstreams};

fn mesh(outbound: SocketAddr, v1: SocketAddr, v2: SocketAddr, web_to: &str) -> String {
    format!(
        r#"mesh:
  outbound_port: {}
services:
  - name: web
    endpoints: [{{address: "{v1}"}}]
    routes:
      - match: {{prefix: /}}
        backends: [{{service: {web_to}}}]
  - name: web-v2
    endpoints: [{{address: "{v2}"}}]
"#,
        outbound.port()
    )
}

async fn start_control_plane(mesh_text: &str) -> (ControlPlane, PathBuf) {
    let path = temp_path("mesh.yaml");
    std::fs::write(&path, mesh_text).unwrap();
    let options = app::Options {
        mesh_path: path.clone(),
        xds_address: "127.0.0.1:0".parse().unwrap(),
        admin_address: "127.0.0.1:0".parse().unwrap(),
        identity: Default::default(),
        load_reports: Default::default(),
    };
    (
        app::start(options).await.expect("control plane starts"),
        path,
    )
}

/// Waits until the node has ACKed, for every type, the version the control plane sent last.
async fn wait_all_acked(cp: &ControlPlane, node: &'static str) -> serde_json::Value {
    let admin = cp.admin_addr;
    eventually(
        "every type ACKed at its latest version",
        Duration::from_secs(10),
        || async move {
            let status: serde_json::Value =
                serde_json::from_str(&get(admin, "/status").await.body).ok()?;
            let types = status["nodes"][node]["types"].as_object()?.clone();
            let all = [
                "Cluster",
                "ClusterLoadAssignment",
                "Listener",
                "RouteConfiguration",
            ];
            let acked = all.iter().all(|t| {
                let s = &types.get(*t).cloned().unwrap_or_default();
                s["sent_version"].is_string() && s["sent_version"] == s["acked_version"]
            });
            acked.then_some(status)
        },
    )
    .await
}

async fn envoy_routes_to(outbound: SocketAddr, host: &str) -> Option<String> {
    let r = TestClient::http1(outbound).get(host, "/").await.ok()?;
    (r.status == 200).then(|| r.header("x-upstream").unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_follows_the_mesh_over_sotw_ads() {
    let (v1, v2) = (upstreams::http("v1").await, upstreams::http("v2").await);
    let (outbound, envoy_admin) = (free_addr(), free_addr());
    let (cp, mesh_path) = start_control_plane(&mesh(outbound, v1.addr, v2.addr, "web")).await;
    let _envoy = Envoy::ads("envoy-sotw", "GRPC", cp.xds_addr, envoy_admin);

    let upstream = eventually(
        "Envoy routes web to v1",
        Duration::from_secs(30),
        || async move {
            envoy_routes_to(outbound, "web.default.svc.cluster.local")
                .await
                .filter(|u| u == "v1")
        },
    )
    .await;
    assert_eq!(upstream, "v1");
    let status = wait_all_acked(&cp, "envoy-sotw").await;

    // Envoy's own view agrees: every dynamic resource carries the version we sent.
    let dump = get(envoy_admin, "/config_dump").await.body;
    let listener_version = status["mesh"]["type_versions"]["Listener"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        dump.contains(&format!("\"version_info\": \"{listener_version}\"")),
        "config_dump lacks version {listener_version}"
    );
    // `proxy-config --node` shows what the control plane serves this Envoy: its routes lead
    // to web, whose endpoint is v1.
    let proxy_config = |part: &'static str| {
        let admin = cp.admin_addr.to_string();
        let out = std::process::Command::new(outrigger_tests::workspace_binary(
            "outrigger-control-plane",
        ))
        .args([
            "proxy-config",
            part,
            "--node",
            "envoy-sotw",
            "--admin",
            &admin,
        ])
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let routes = proxy_config("routes");
    assert!(routes.contains("web.default:"), "{routes}");
    let endpoints = proxy_config("endpoints");
    assert!(
        endpoints
            .lines()
            .any(|l| l.starts_with("web.default ") && l.contains(&v1.addr.to_string())),
        "{endpoints}"
    );

    // A mesh change reaches Envoy's routing within 2 s.
    std::fs::write(&mesh_path, mesh(outbound, v1.addr, v2.addr, "web-v2")).unwrap();
    let changed = Instant::now();
    eventually(
        "Envoy routes web to v2",
        Duration::from_secs(5),
        || async move { envoy_routes_to(outbound, "web").await.filter(|u| u == "v2") },
    )
    .await;
    let took = changed.elapsed();
    assert!(took < Duration::from_secs(2), "the change took {took:?}");
    let status = wait_all_acked(&cp, "envoy-sotw").await;
    assert_eq!(
        status["nodes"]["envoy-sotw"]["types"]["RouteConfiguration"]["nacks"],
        0
    );

    // A route Envoy cannot accept is NACKed; the NACK shows in /status, Envoy keeps the
    // config it had, and traffic keeps flowing. Envoy's RE2 refuses a regex whose program is
    // larger than 100 (its default limit), which the mesh file's validation lets through.
    let refused = mesh(outbound, v1.addr, v2.addr, "web-v2").replace(
        "      - match: {prefix: /}\n",
        "      - match: {regex: \"/items/[a-z0-9]{40}/[a-z0-9]{40}\"}\n        backends: [{service: web}]\n      - match: {prefix: /}\n",
    );
    assert_ne!(refused, mesh(outbound, v1.addr, v2.addr, "web-v2"));
    std::fs::write(&mesh_path, refused).unwrap();
    let admin = cp.admin_addr;
    let nack = eventually(
        "/status shows Envoy's NACK",
        Duration::from_secs(10),
        || async move {
            let status: serde_json::Value =
                serde_json::from_str(&get(admin, "/status").await.body).ok()?;
            let nack =
                status["nodes"]["envoy-sotw"]["types"]["RouteConfiguration"]["last_nack"].clone();
            nack.is_object().then_some(nack)
        },
    )
    .await;
    assert!(
        !nack["message"].as_str().unwrap_or_default().is_empty(),
        "{nack}"
    );
    eprintln!("mesh change reached Envoy's routing in {took:?}; Envoy's NACK: {nack}");
    assert_eq!(
        envoy_routes_to(outbound, "web").await.as_deref(),
        Some("v2")
    );
    let metrics = get(admin, "/metrics").await.body;
    assert!(
        metrics.contains("outrigger_cp_nacks_total{node=\"envoy-sotw\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_follows_the_mesh_over_delta_ads() {
    let (v1, v2) = (upstreams::http("v1").await, upstreams::http("v2").await);
    let (outbound, envoy_admin) = (free_addr(), free_addr());
    let (cp, mesh_path) = start_control_plane(&mesh(outbound, v1.addr, v2.addr, "web")).await;
    let _envoy = Envoy::ads("envoy-delta", "DELTA_GRPC", cp.xds_addr, envoy_admin);

    eventually(
        "Envoy routes web to v1",
        Duration::from_secs(30),
        || async move { envoy_routes_to(outbound, "web").await.filter(|u| u == "v1") },
    )
    .await;
    wait_all_acked(&cp, "envoy-delta").await;

    std::fs::write(&mesh_path, mesh(outbound, v1.addr, v2.addr, "web-v2")).unwrap();
    let changed = Instant::now();
    eventually(
        "Envoy routes web to v2",
        Duration::from_secs(5),
        || async move { envoy_routes_to(outbound, "web").await.filter(|u| u == "v2") },
    )
    .await;
    let took = changed.elapsed();
    assert!(took < Duration::from_secs(2), "the change took {took:?}");
    wait_all_acked(&cp, "envoy-delta").await;

    // Removing a service removes its cluster from Envoy: delta sends the name as removed.
    let without_v2 = mesh(outbound, v1.addr, v2.addr, "web").replace(
        &format!(
            r#"  - name: web-v2
    endpoints: [{{address: "{}"}}]
"#,
            v2.addr
        ),
        "",
    );
    std::fs::write(&mesh_path, without_v2).unwrap();
    eventually(
        "Envoy drops the web-v2 cluster",
        Duration::from_secs(5),
        || async move {
            let clusters = get(envoy_admin, "/clusters").await.body;
            (!clusters.contains("web-v2.default::") && clusters.contains("web.default::"))
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        envoy_routes_to(outbound, "web").await.as_deref(),
        Some("v1")
    );
    let status = wait_all_acked(&cp, "envoy-delta").await;
    assert_eq!(
        status["nodes"]["envoy-delta"]["types"]["Cluster"]["nacks"], 0,
        "{status}"
    );
    eprintln!("delta: mesh change reached Envoy's routing in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_accepts_the_meshs_resilience_policies() {
    let v1 = upstreams::http("v1").await;
    let (outbound, envoy_admin) = (free_addr(), free_addr());
    let mesh_text = format!(
        r#"mesh:
  outbound_port: {port}
services:
  - name: web
    endpoints: [{{address: "{v1}"}}]
    policy:
      retry: {{attempts: 2, on: [connect-failure, gateway-error, unavailable], per_try_timeout: 500ms}}
      circuit_breaker: {{max_connections: 100, max_pending: 50, max_requests: 200, max_retries: 3, retry_budget_percent: 20, retry_budget_min_retries: 10}}
      outlier: {{consecutive_5xx: 5, consecutive_gateway_failure: 5, base_ejection: 30s, max_ejection: 300s, max_ejection_percent: 50}}
    routes:
      - match: {{prefix: /checkout}}
        retry: {{attempts: 0}}
      - match: {{prefix: /limited}}
        retry: {{attempts: 1, on: [gateway-error], status_codes: [429]}}
        rate_limit: {{requests_per_second: 1, burst: 1}}
  - name: plain
    endpoints: [{{address: "{v1}"}}]
"#,
        port = outbound.port(),
        v1 = v1.addr
    );
    let (cp, _) = start_control_plane(&mesh_text).await;
    let _envoy = Envoy::ads("envoy-policy", "GRPC", cp.xds_addr, envoy_admin);
    eventually("Envoy routes web", Duration::from_secs(30), || async move {
        envoy_routes_to(outbound, "web").await.filter(|u| u == "v1")
    })
    .await;
    let status = wait_all_acked(&cp, "envoy-policy").await;
    for t in ["Cluster", "RouteConfiguration"] {
        assert_eq!(
            status["nodes"]["envoy-policy"]["types"][t]["nacks"], 0,
            "{status}"
        );
    }
    let dump = get(envoy_admin, "/config_dump").await.body;
    for want in [
        "\"retry_on\": \"connect-failure,gateway-error,unavailable\"",
        "\"num_retries\": 2",
        "\"retry_back_off\"",
        "\"outlier_detection\"",
        "\"consecutive_gateway_failure\": 5",
        "\"retry_budget\"",
        "\"max_retries\": 3",
        "\"retriable_status_codes\"",
        "envoy.filters.http.local_ratelimit",
    ] {
        assert!(dump.contains(want), "Envoy's config_dump lacks {want}");
    }
    // `plain` says nothing about resilience: the mesh's defaults reach Envoy explicitly.
    assert!(
        dump.contains(
            "\"retry_on\": \"connect-failure,refused-stream,reset,gateway-error,unavailable\""
        ),
        "the default retry policy is not in Envoy's config_dump"
    );
    assert!(
        dump.matches("\"consecutive_5xx\": 5").count() >= 2,
        "the default outlier detection is not in Envoy's config_dump"
    );
    // Envoy enforces the route's limit: a burst of one, then 429.
    let client = TestClient::http1(outbound);
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(client.get("web", "/limited").await.unwrap().status.as_u16());
    }
    assert_eq!(statuses[0], 200, "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
}
