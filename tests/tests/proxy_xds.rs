//! Our own proxies configured by our control plane over ADS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, route, route_action,
    route_match,
};
use outrigger_control_plane::app::{self, ControlPlane};
use outrigger_control_plane::mesh::Mesh;
use outrigger_control_plane::translate::{ROUTE_TYPE, pack, translate};
use outrigger_tests::clients::{TestClient, get};
use outrigger_tests::fake_ads::FakeAds;
use outrigger_tests::faults;
use outrigger_tests::{TestProxy, eventually, free_addr, temp_path, upstreams, workspace_binary};

fn mesh(v1: SocketAddr, v2: SocketAddr, web_to: &str) -> String {
    format!(
        r#"services:
  - name: web
    endpoints: [{{address: "{v1}"}}]
    routes:
      - backends: [{{service: {web_to}}}]
  - name: web-v2
    protocol: http2
    endpoints: [{{address: "{v2}"}}]
"#
    )
}

fn proxy_config(xds: SocketAddr, node: &str) -> String {
    format!(
        r#"admin:
  address: 127.0.0.1:0
xds:
  address: "{xds}"
  node: {node}
  service: client
listeners:
  - name: outbound
    address: 127.0.0.1:0
    direction: outbound
    rds: outbound
"#
    )
}

async fn routes_to(proxy: &TestProxy, host: &str) -> Option<String> {
    let r = TestClient::http1(proxy.addr("outbound"))
        .get(host, "/")
        .await
        .ok()?;
    (r.status == 200).then(|| r.header("x-upstream").unwrap_or_default().to_string())
}

async fn all_route_to(proxies: &[TestProxy], want: &str, within: Duration) -> Duration {
    let started = Instant::now();
    for (i, p) in proxies.iter().enumerate() {
        eventually(
            &format!("proxy {i} routes web to {want}"),
            within,
            || async move {
                routes_to(p, "web.default.svc.cluster.local")
                    .await
                    .filter(|u| u == want)
            },
        )
        .await;
    }
    started.elapsed()
}

async fn start_cp(mesh_text: &str) -> (ControlPlane, PathBuf) {
    let path = temp_path("mesh.yaml");
    std::fs::write(&path, mesh_text).unwrap();
    let options = app::Options {
        mesh_path: path.clone(),
        xds_address: "127.0.0.1:0".parse().unwrap(),
        admin_address: "127.0.0.1:0".parse().unwrap(),
        identity: Default::default(),
        load_reports: Default::default(),
    };
    (app::start(options).await.unwrap(), path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_follow_the_mesh() {
    let (v1, v2) = (upstreams::http("v1").await, upstreams::http("v2").await);
    let (cp, mesh_path) = start_cp(&mesh(v1.addr, v2.addr, "web")).await;
    let mut proxies = Vec::new();
    for i in 0..3 {
        proxies.push(TestProxy::start(&proxy_config(cp.xds_addr, &format!("proxy-{i}"))).await);
    }
    all_route_to(&proxies, "v1", Duration::from_secs(10)).await;
    for p in &proxies {
        assert_eq!(get(p.admin(), "/ready").await.status, 200);
    }

    // A mesh change reaches every proxy within a second (HTTP/2 to web-v2 on the way).
    std::fs::write(&mesh_path, mesh(v1.addr, v2.addr, "web-v2")).unwrap();
    let took = all_route_to(&proxies, "v2", Duration::from_secs(5)).await;
    eprintln!(
        "mesh change reached all {} proxies in {took:?}",
        proxies.len()
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

/// A route using a field the proxy does not implement is NACKed with the field's name, and the
/// proxy keeps serving its last good config. The resources come from a fake ADS server, so the
/// test says exactly what the proxy sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_field_the_proxy_cannot_honour_is_nacked_by_name_and_the_old_config_serves() {
    let (v1, v2) = (upstreams::http("v1").await, upstreams::http("v2").await);
    let ads = FakeAds::start().await;
    let good = Mesh::parse("mesh.yaml", &mesh(v1.addr, v2.addr, "web-v2")).unwrap();
    for (type_url, resources) in translate(&good) {
        ads.push(type_url, "1", resources.by_name.into_values().collect());
    }
    let proxy = TestProxy::start(&proxy_config(ads.addr, "proxy-0")).await;
    let proxy_ref = &proxy;
    eventually(
        "the proxy routes web to v2",
        Duration::from_secs(10),
        || async move { routes_to(proxy_ref, "web").await.filter(|u| u == "v2") },
    )
    .await;

    let hashing = RouteConfiguration {
        name: "outbound".into(),
        virtual_hosts: vec![VirtualHost {
            name: "web".into(),
            domains: vec!["*".into()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                        "web.default".into(),
                    )),
                    hash_policy: vec![Default::default()],
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    ads.push(ROUTE_TYPE, "2", vec![pack(&hashing)]);
    let nack = ads
        .request(
            "the proxy NACKs the hash policy",
            Duration::from_secs(10),
            |r| r.type_url == ROUTE_TYPE && r.error_detail.is_some(),
        )
        .await;
    let message = nack.error_detail.unwrap().message;
    assert!(message.contains("hash_policy"), "{message}");
    assert_eq!(
        nack.version_info, "1",
        "the NACK names the version still in use"
    );
    assert_eq!(
        routes_to(&proxy, "web").await.as_deref(),
        Some("v2"),
        "the old config keeps serving"
    );
}

struct CpProcess(Child);

impl CpProcess {
    fn start(mesh: &PathBuf, xds: SocketAddr, admin: SocketAddr) -> CpProcess {
        let child = Command::new(workspace_binary("outrigger-control-plane"))
            .args(["serve", "--mesh"])
            .arg(mesh)
            .args(["--xds", &xds.to_string(), "--admin", &admin.to_string()])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        CpProcess(child)
    }
}

impl Drop for CpProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_killed_under_load_then_restarted() {
    let (v1, v2) = (upstreams::http("v1").await, upstreams::http("v2").await);
    let mesh_path = temp_path("mesh.yaml");
    std::fs::write(&mesh_path, mesh(v1.addr, v2.addr, "web")).unwrap();
    let (xds, admin) = (free_addr(), free_addr());
    let mut cp = CpProcess::start(&mesh_path, xds, admin);
    let proxies = vec![
        TestProxy::start(&proxy_config(xds, "killed-0")).await,
        TestProxy::start(&proxy_config(xds, "killed-1")).await,
    ];
    all_route_to(&proxies, "v1", Duration::from_secs(15)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for p in &proxies {
        let client = TestClient::http1(p.addr("outbound"));
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client.get("web", "/").await {
                    Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("failed: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }

    // Kill the control plane outright, and keep the load going without it.
    cp.0.kill().unwrap();
    cp.0.wait().unwrap();
    let before = ok.load(Ordering::Relaxed);
    eventually(
        "traffic flows without the control plane",
        Duration::from_secs(10),
        || {
            let ok = ok.clone();
            async move { (ok.load(Ordering::Relaxed) > before + 500).then_some(()) }
        },
    )
    .await;

    // Restart it on the same address with a changed mesh: the proxies reconnect and resync.
    std::fs::write(&mesh_path, mesh(v1.addr, v2.addr, "web-v2")).unwrap();
    let _cp = CpProcess::start(&mesh_path, xds, admin);
    all_route_to(&proxies, "v2", Duration::from_secs(20)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed while the control plane was away"
    );
    eprintln!(
        "{} requests, none failed, across the control plane's death and restart",
        ok.load(Ordering::Relaxed)
    );
    let status: serde_json::Value =
        serde_json::from_str(&get(admin, "/status").await.body).unwrap();
    for node in ["killed-0", "killed-1"] {
        assert_eq!(status["nodes"][node]["connected"], true, "{status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_the_first_complete_config() {
    let v1 = upstreams::http("v1").await;
    let mesh_path = temp_path("mesh.yaml");
    std::fs::write(&mesh_path, mesh(v1.addr, v1.addr, "web")).unwrap();
    let (xds, admin) = (free_addr(), free_addr());
    // The proxy starts first, with nobody at its control plane's address.
    let proxy = TestProxy::start(&proxy_config(xds, "early")).await;
    assert_eq!(get(proxy.admin(), "/ready").await.status, 503);
    assert_eq!(get(proxy.admin(), "/live").await.status, 200);
    assert_eq!(routes_to(&proxy, "web").await, None, "no routes yet: 404");

    let _cp = CpProcess::start(&mesh_path, xds, admin);
    let proxy_admin = proxy.admin();
    eventually(
        "ready once the control plane answered",
        Duration::from_secs(20),
        || async move { (get(proxy_admin, "/ready").await.status == 200).then_some(()) },
    )
    .await;
    assert_eq!(routes_to(&proxy, "web").await.as_deref(), Some("v1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_gets_only_what_its_service_may_call() {
    let (v1, v2) = (upstreams::http("v1").await, upstreams::http("v2").await);
    let mesh_text = format!(
        r#"services:
  - name: front
    calls: [web]
  - name: web
    endpoints: [{{address: "{v1}"}}]
    routes:
      - backends: [{{service: web-v2}}]
  - name: web-v2
    endpoints: [{{address: "{v2}"}}]
  - name: billing
    endpoints: [{{address: "{v1}"}}]
"#,
        v1 = v1.addr,
        v2 = v2.addr
    );
    let (cp, _) = start_cp(&mesh_text).await;
    let scoped = TestProxy::start(
        &proxy_config(cp.xds_addr, "front-1").replace("service: client", "service: front"),
    )
    .await;
    let everything = TestProxy::start(&proxy_config(cp.xds_addr, "client-1")).await;
    for p in [&scoped, &everything] {
        let admin = p.admin();
        eventually("ready", Duration::from_secs(10), || async move {
            (get(admin, "/ready").await.status == 200).then_some(())
        })
        .await;
    }
    // `front` may call `web`, whose route leads on to `web-v2`; `billing` is not its business.
    assert_eq!(routes_to(&scoped, "web").await.as_deref(), Some("v2"));
    assert_eq!(routes_to(&scoped, "billing").await, None);
    let config: serde_json::Value =
        serde_json::from_str(&get(scoped.admin(), "/config").await.body).unwrap();
    let clusters: Vec<&str> = config["snapshot"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(clusters, ["web-v2.default", "web.default"]);
    // A node whose service has no `calls` list gets the whole mesh.
    assert_eq!(
        routes_to(&everything, "billing").await.as_deref(),
        Some("v1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_proxy_serves_its_cached_config_while_the_control_plane_is_away() {
    let (v1, v2) = (upstreams::http("v1").await, upstreams::http("v2").await);
    let mesh_path = temp_path("mesh.yaml");
    std::fs::write(&mesh_path, mesh(v1.addr, v2.addr, "web-v2")).unwrap();
    let (xds, admin) = (free_addr(), free_addr());
    let cache = temp_path("xds-cache.bin");
    let config = proxy_config(xds, "cached").replace(
        "  service: client\n",
        &format!(
            r#"  service: client
  cache: "{}"
"#,
            cache.display()
        ),
    );

    let cp = CpProcess::start(&mesh_path, xds, admin);
    let first = TestProxy::start(&config).await;
    all_route_to(std::slice::from_ref(&first), "v2", Duration::from_secs(15)).await;
    let cache_path = cache.clone();
    eventually("the cache is written", Duration::from_secs(5), || {
        let cache_path = cache_path.clone();
        async move { cache_path.exists().then_some(()) }
    })
    .await;
    drop(first);
    drop(cp);

    // A new proxy, and no control plane: it serves the cached config and says it is ready.
    let second = TestProxy::start(&config).await;
    assert_eq!(get(second.admin(), "/ready").await.status, 200);
    assert_eq!(routes_to(&second, "web").await.as_deref(), Some("v2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_directory_is_one_mesh_and_errors_name_their_file() {
    let (v1, v2) = (upstreams::http("v1").await, upstreams::http("v2").await);
    let dir = temp_path("mesh.d");
    std::fs::create_dir_all(&dir).unwrap();
    let web = format!(
        r#"services:
  - name: web
    endpoints: [{{address: "{}"}}]
    routes:
      - backends: [{{service: web-v2}}]
"#,
        v1.addr
    );
    let web_v2 = format!(
        r#"services:
  - name: web-v2
    endpoints: [{{address: "{}"}}]
"#,
        v2.addr
    );
    std::fs::write(dir.join("10-web.yaml"), &web).unwrap();
    std::fs::write(dir.join("20-web-v2.yaml"), &web_v2).unwrap();
    std::fs::write(dir.join("README.txt"), "not yaml: ignored").unwrap();
    let cp = app::start(app::Options {
        mesh_path: dir.clone(),
        xds_address: "127.0.0.1:0".parse().unwrap(),
        admin_address: "127.0.0.1:0".parse().unwrap(),
        identity: Default::default(),
        load_reports: Default::default(),
    })
    .await
    .unwrap();
    let proxy = TestProxy::start(&proxy_config(cp.xds_addr, "dir-1")).await;
    all_route_to(std::slice::from_ref(&proxy), "v2", Duration::from_secs(10)).await;

    // Break the second file: the error names it and its line; the mesh keeps serving.
    std::fs::write(
        dir.join("20-web-v2.yaml"),
        web_v2.replace(&v2.addr.to_string(), "nowhere"),
    )
    .unwrap();
    let err = cp.reload().unwrap_err();
    assert!(err.file.ends_with("20-web-v2.yaml"), "{err}");
    assert_eq!(err.line, Some(3), "{err}");
    assert_eq!(routes_to(&proxy, "web").await.as_deref(), Some("v2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_policy_in_the_mesh_changes_the_proxy_live() {
    let (up, seen) = upstreams::fail_first().await;
    let service = format!(
        r#"services:
  - name: web
    endpoints: [{{address: "{}"}}]
"#,
        up.addr
    );
    // Retries are on by default; this mesh starts with them turned off.
    let without = format!(
        r#"{service}    policy:
      retry: {{attempts: 0}}
"#
    );
    let with = format!(
        r#"{service}    policy:
      retry: {{attempts: 2, on: [gateway-error]}}
"#
    );
    let (cp, mesh_path) = start_cp(&without).await;
    let proxy = TestProxy::start(&proxy_config(cp.xds_addr, "retrying")).await;
    let client = TestClient::http1(proxy.addr("outbound"));
    let status_of = |path: String| {
        let client = client.clone();
        async move {
            client
                .get("web", &path)
                .await
                .ok()
                .map(|r| r.status.as_u16())
        }
    };
    eventually("routes arrive", Duration::from_secs(10), || async {
        status_of("/warmup".into()).await.filter(|s| *s == 200)
    })
    .await;
    assert_eq!(
        status_of("/fail-once/before".into()).await,
        Some(503),
        "retries turned off"
    );

    std::fs::write(&mesh_path, with).unwrap();
    let mut n = 0;
    eventually(
        "the retry policy takes effect",
        Duration::from_secs(5),
        || {
            n += 1;
            let attempt = status_of(format!("/fail-once/after-{n}"));
            async move { attempt.await.filter(|s| *s == 200) }
        },
    )
    .await;
    let status: serde_json::Value =
        serde_json::from_str(&get(cp.admin_addr, "/status").await.body).unwrap();
    assert_eq!(
        status["nodes"]["retrying"]["types"]["RouteConfiguration"]["nacks"], 0,
        "{status}"
    );
    assert_eq!(
        seen.lock().unwrap().get("/fail-once/before").copied(),
        Some(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_and_rate_limit_policies_in_the_mesh_change_the_proxy_live() {
    let (good, _) = faults::faulty("good").await;
    let (bad, bad_faults) = faults::faulty("bad").await;
    bad_faults.fail(100, 503);
    let service = format!(
        r#"services:
  - name: web
    endpoints: [{{address: "{}"}}, {{address: "{}"}}]
"#,
        good.addr, bad.addr
    );
    // Retries and outlier detection are on by default; this mesh starts with both off, sent
    // as off, so the proxy's own defaults do not turn them back on.
    let base = format!(
        r#"{service}    policy:
      retry: {{attempts: 0}}
"#
    );
    let (cp, mesh_path) = start_cp(&format!("{base}      outlier: {{enabled: false}}\n")).await;
    let proxy = TestProxy::start(&proxy_config(cp.xds_addr, "policies")).await;
    let client = TestClient::http1(proxy.addr("outbound"));
    // Concurrent, so that the balancer spreads them: one at a time, the endpoint with the
    // best latency record would take them all.
    let statuses = |n: usize| {
        let calls: Vec<_> = (0..n)
            .map(|_| {
                let client = client.clone();
                async move {
                    client
                        .get("web", "/")
                        .await
                        .map_or(0, |r| r.status.as_u16())
                }
            })
            .collect();
        futures_util::future::join_all(calls)
    };
    eventually("routes arrive", Duration::from_secs(10), || async {
        statuses(1)
            .await
            .iter()
            .any(|s| [200, 503].contains(s))
            .then_some(())
    })
    .await;
    assert!(
        statuses(40).await.contains(&503),
        "with outlier detection off, the bad endpoint keeps its share"
    );

    // An outlier policy: the bad endpoint is ejected, and the client stops seeing it.
    let with_outlier = format!("{base}      outlier: {{consecutive_5xx: 3, base_ejection: 60s}}\n");
    std::fs::write(&mesh_path, &with_outlier).unwrap();
    eventually(
        "the bad endpoint is ejected",
        Duration::from_secs(10),
        || async {
            statuses(5).await;
            get(proxy.admin(), "/metrics")
                .await
                .body
                .lines()
                .any(|l| l.starts_with("outrigger_outlier_ejected_endpoints{") && l.ends_with(" 1"))
                .then_some(())
        },
    )
    .await;
    assert!(statuses(40).await.iter().all(|s| *s == 200));

    // A rate limit on top: one request a second gets through, the rest are told to wait.
    std::fs::write(
        &mesh_path,
        format!("{with_outlier}      rate_limit: {{requests_per_second: 1, burst: 1}}\n"),
    )
    .unwrap();
    eventually(
        "the rate limit takes effect",
        Duration::from_secs(10),
        || async {
            let r = client.get("web", "/").await.ok()?;
            (r.status == 429 && r.header("retry-after") == Some("1")).then_some(())
        },
    )
    .await;
    let status: serde_json::Value =
        serde_json::from_str(&get(cp.admin_addr, "/status").await.body).unwrap();
    for t in ["Cluster", "RouteConfiguration"] {
        assert_eq!(
            status["nodes"]["policies"]["types"][t]["nacks"], 0,
            "{status}"
        );
    }
}
