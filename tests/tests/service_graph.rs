//! Load reports end to end: sidecars report what they send over LRS, the control plane folds
//! the reports into its service graph, and `outrigger-control-plane stat` (the real binary)
//! reads it back. A known traffic pattern must come out as known figures.

use std::net::SocketAddr;

use outrigger_tests::clients::get;
use outrigger_tests::mesh_traffic::four_edges;
use outrigger_tests::{eventually, workspace_binary};
use serde_json::Value;
use std::time::Duration;

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
    let (cp, _traffic) = four_edges().await;

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

    // Per route, as callers used it: audit's default route takes both callers' requests.
    let routes: Vec<Value> = serde_json::from_str(&stat(
        cp.admin_addr,
        &["routes", "--window", "5s", "-o", "json"],
    ))
    .unwrap();
    for (service, route, rate, success, callers) in [
        ("audit.default", "audit/default", 40.0, 0.925, 2),
        ("api.default", "api/default", 40.0, 1.0, 1),
    ] {
        let r = routes
            .iter()
            .find(|r| r["service"] == service && r["route"] == route)
            .unwrap_or_else(|| panic!("no route {route} of {service} in {routes:#?}"));
        let rps = r["rps"].as_f64().unwrap();
        let got = r["success_rate"].as_f64().unwrap();
        assert!(
            (rps / rate - 1.0).abs() <= 0.10,
            "{route}: {rps} rps, sent {rate}"
        );
        assert!(
            (got - success).abs() <= 0.02,
            "{route}: success {got}, expected {success}"
        );
        assert_eq!(r["callers"], callers, "{r}");
    }

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
