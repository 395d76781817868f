//! Load reports end to end: sidecars report what they send over LRS, the control plane folds
//! the reports into its service graph, and `outrigger-control-plane stat` (the real binary)
//! reads it back. A known traffic pattern must come out as known figures.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use outrigger_control_plane::app::{self, ControlPlane};
use outrigger_control_plane::service_graph::Limits;
use outrigger_tests::clients::{TestClient, get};
use outrigger_tests::faults::faulty;
use outrigger_tests::{TestProxy, eventually, temp_path, workspace_binary, xds_config};
use serde_json::Value;

/// Reports once a second, so that a test's window fills in seconds.
pub async fn control_plane(yaml: &str) -> ControlPlane {
    let mesh_path = temp_path("mesh.yaml");
    std::fs::write(&mesh_path, yaml).unwrap();
    app::start(app::Options {
        mesh_path,
        xds_address: "127.0.0.1:0".parse().unwrap(),
        admin_address: "127.0.0.1:0".parse().unwrap(),
        identity: Default::default(),
        load_reports: Limits {
            interval: Duration::from_secs(1),
            ..Default::default()
        },
    })
    .await
    .expect("the control plane starts")
}

async fn sidecar(xds: SocketAddr, service: &str) -> TestProxy {
    TestProxy::start(&xds_config(&format!(
        "address: \"{xds}\"\nnode: {service}-1\nservice: {service}"
    )))
    .await
}

/// Sends `rate` requests a second for `host` through `proxy` until the test ends; every
/// `fail_every`-th asks its upstream for a 500. Counts the answers that came back.
fn load(proxy: SocketAddr, host: &'static str, rate: u32, fail_every: u32) -> Arc<AtomicU64> {
    let answered = Arc::new(AtomicU64::new(0));
    let counter = answered.clone();
    let client = TestClient::http1(proxy);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
        for n in 1u32.. {
            tick.tick().await;
            let path = if fail_every > 0 && n % fail_every == 0 {
                "/status/500"
            } else {
                "/"
            };
            let (client, counter) = (client.clone(), counter.clone());
            tokio::spawn(async move {
                if client.get(host, path).await.is_ok() {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    answered
}

fn stat(admin: SocketAddr, args: &[&str]) -> String {
    let out = std::process::Command::new(workspace_binary("outrigger-control-plane"))
        .arg("stat")
        .args(args)
        .args(["--admin", &admin.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn edge<'a>(edges: &'a [Value], caller: &str, callee: &str) -> &'a Value {
    edges
        .iter()
        .find(|e| e["caller"] == caller && e["callee"] == callee)
        .unwrap_or_else(|| panic!("no edge {caller} -> {callee} in {edges:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stat_reports_each_edges_rate_and_success_from_the_sidecars_load_reports() {
    let (api, _) = faulty("api").await;
    let (db, _) = faulty("db").await;
    let (audit, _) = faulty("audit").await;
    let cp = control_plane(&format!(
        r#"services:
  - name: web
    endpoints: [{{address: "127.0.0.1:9"}}]
  - name: api
    endpoints: [{{address: "{}"}}]
  - name: db
    endpoints: [{{address: "{}"}}]
  - name: audit
    endpoints: [{{address: "{}"}}]
"#,
        api.addr, db.addr, audit.addr
    ))
    .await;
    let web_sidecar = sidecar(cp.xds_addr, "web").await;
    let api_sidecar = sidecar(cp.xds_addr, "api").await;
    let db_sidecar = sidecar(cp.xds_addr, "db").await;
    // Each sidecar has its routes once a call to a service it will call goes through.
    for (proxy, callee) in [
        (&web_sidecar, "api"),
        (&api_sidecar, "audit"),
        (&db_sidecar, "audit"),
    ] {
        let client = TestClient::http1(proxy.addr("outbound"));
        eventually(
            "the sidecar has its routes",
            Duration::from_secs(10),
            || {
                let client = client.clone();
                async move { (client.get(callee, "/").await.ok()?.status == 200).then_some(()) }
            },
        )
        .await;
    }
    // The pattern: web → api 40/s and web → db 20/s, api → audit 30/s with one request in
    // ten failing, db → audit 10/s.
    let _web_api = load(web_sidecar.addr("outbound"), "api", 40, 0);
    let _web_db = load(web_sidecar.addr("outbound"), "db", 20, 0);
    let _api_audit = load(api_sidecar.addr("outbound"), "audit", 30, 10);
    let _db_audit = load(db_sidecar.addr("outbound"), "audit", 10, 0);

    // Wait until every edge's figures cover the whole 5 s window.
    let edges: Vec<Value> = eventually(
        "five seconds of reports on each edge",
        Duration::from_secs(30),
        || async {
            let out = stat(cp.admin_addr, &["edges", "--window", "5s", "-o", "json"]);
            let edges: Vec<Value> = serde_json::from_str(&out).unwrap();
            let full = edges
                .iter()
                .filter(|e| e["seconds"].as_f64() >= Some(5.0))
                .count();
            (full >= 4).then_some(edges)
        },
    )
    .await;
    for (caller, callee, rate, success) in [
        ("web.default", "api.default", 40.0, 1.0),
        ("web.default", "db.default", 20.0, 1.0),
        ("api.default", "audit.default", 30.0, 0.9),
        ("db.default", "audit.default", 10.0, 1.0),
    ] {
        let e = edge(&edges, caller, callee);
        let rps = e["rps"].as_f64().unwrap();
        let got = e["success_rate"].as_f64().unwrap();
        assert!(
            (rps / rate - 1.0).abs() <= 0.10,
            "{caller} -> {callee}: {rps} rps, sent {rate}"
        );
        assert!(
            (got - success).abs() <= 0.02,
            "{caller} -> {callee}: success {got}, expected {success}"
        );
        assert!(e["p99_ms"].as_f64().is_some(), "{e}");
    }
    assert_eq!(edges.len(), 4, "no other edge: {edges:#?}");

    // The same figures per service, and as a table for people.
    let services: Vec<Value> = serde_json::from_str(&stat(
        cp.admin_addr,
        &["services", "--window", "5s", "-o", "json"],
    ))
    .unwrap();
    let audit_row = services
        .iter()
        .find(|s| s["service"] == "audit.default")
        .expect("audit is a service with callers");
    assert_eq!(audit_row["callers"], 2);
    let audit_rps = audit_row["rps"].as_f64().unwrap();
    assert!((audit_rps / 40.0 - 1.0).abs() <= 0.10, "{audit_rps}");
    let table = stat(
        cp.admin_addr,
        &["edges", "--window", "5s", "--sort", "success"],
    );
    let first_row = table.lines().nth(1).unwrap();
    assert!(
        first_row.starts_with("api.default") && first_row.contains("audit.default"),
        "the failing edge sorts first:\n{table}"
    );

    let metrics = get(cp.admin_addr, "/metrics").await.body;
    assert!(
        outrigger_tests::metric(
            &metrics,
            "outrigger_cp_load_reports_total{result=\"accepted\"}"
        ) >= 4
    );
    assert_eq!(
        outrigger_tests::metric(&metrics, "outrigger_cp_graph_edges"),
        4
    );
}
