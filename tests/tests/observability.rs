//! The Grafana dashboard and the Prometheus rules in deploy/observability/ name only metrics
//! that a running proxy and control plane expose, and are well-formed.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use outrigger_tests::clients::{TestClient, get};
use outrigger_tests::{TestProxy, control_plane, eventually, xds_config};
use serde_json::Value;

fn repo_file(path: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    std::fs::read_to_string(root.join(path)).unwrap()
}

/// Metric families on a page, by name, with their type (from the `# TYPE` lines).
fn families(page: &str) -> BTreeMap<String, String> {
    page.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            Some((parts.next()?.to_string(), parts.next()?.to_string()))
        })
        .collect()
}

/// Whether `series` (as PromQL names it) is a series of one of `families`.
fn exposed(series: &str, families: &BTreeMap<String, String>) -> bool {
    let kind = |name: &str| families.get(name).map(String::as_str);
    if matches!(kind(series), Some("gauge" | "counter" | "histogram")) {
        return true;
    }
    let base = |suffix: &str| series.strip_suffix(suffix);
    base("_total").is_some_and(|b| kind(b) == Some("counter"))
        || ["_bucket", "_sum", "_count"]
            .iter()
            .any(|s| base(s).is_some_and(|b| kind(b) == Some("histogram")))
}

/// Every `outrigger_…` name in `text`.
fn named_metrics(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("outrigger_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    names.sort();
    names.dedup();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alerts_use_is_exposed() {
    let cp = control_plane(
        r#"services:
  - name: api
    endpoints: [{address: "127.0.0.1:9"}]
"#,
    )
    .await;
    let proxy = TestProxy::start(&xds_config(&format!(
        "address: \"{}\"\nnode: web-1\nservice: web",
        cp.xds_addr
    )))
    .await;
    let client = TestClient::http1(proxy.addr("outbound"));
    // Routed (nothing listens at the endpoint: 503 after retries), so every route and
    // cluster series is declared.
    eventually(
        "the proxy routes to api",
        Duration::from_secs(10),
        || async { (client.get("api", "/").await.ok()?.status == 503).then_some(()) },
    )
    .await;
    let mut exposed_families = families(&get(proxy.admin(), "/metrics").await.body);
    exposed_families.extend(families(&get(cp.admin_addr, "/metrics").await.body));

    let dashboard = repo_file("deploy/observability/grafana-dashboard.json");
    let rules = repo_file("deploy/observability/prometheus-rules.yaml");
    let mut used = named_metrics(&dashboard);
    used.extend(named_metrics(&rules));
    assert!(used.len() >= 10, "{used:?}");
    let missing: Vec<&String> = used
        .iter()
        .filter(|m| !exposed(m, &exposed_families))
        .collect();
    assert!(missing.is_empty(), "not on any /metrics page: {missing:?}");
    // The check itself can fail.
    assert!(!exposed("outrigger_made_up_total", &exposed_families));
    assert!(exposed(
        "outrigger_request_duration_seconds_bucket",
        &exposed_families
    ));

    // Well-formed: each panel queries, each rule alerts with a severity and a summary.
    let dashboard: Value = serde_json::from_str(&dashboard).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty() && targets.iter().all(|t| t["expr"].is_string()));
    }
    let rules: Value = serde_saphyr::from_str(&rules).unwrap();
    let mut alerts = 0;
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            assert!(
                rule["alert"].is_string() && rule["expr"].is_string(),
                "{rule}"
            );
            assert!(rule["labels"]["severity"].is_string(), "{rule}");
            assert!(rule["annotations"]["summary"].is_string(), "{rule}");
            alerts += 1;
        }
    }
    assert!(alerts >= 6);
}
