//! `/metrics` is valid OpenMetrics by the Prometheus client's own strict parser (Python
//! `prometheus_client`), and carries every family operators rely on, with trace-ID exemplars
//! on the latency histogram.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use outrigger_control_plane::ca::{Ca, DEFAULT_LIFETIME};
use outrigger_core::spiffe::SpiffeId;
use outrigger_tests::clients::{TestClient, get};
use outrigger_tests::{TestProxy, faults, free_addr, otlp, write_identity};

fn parse_with_prometheus_client(page: &str) -> serde_json::Value {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new(root.join("../.venv/bin/python"))
        .arg(root.join("interop/parse_metrics.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("scripts/test makes .venv with prometheus-client");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the parser refused the page: {}\n{page}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_carry_the_families_operators_need() {
    let (collector, _spans) = otlp::grpc_receiver().await;
    let (up, _) = faults::faulty("app").await;
    // Every kind of listener and policy, so that every family has a series.
    let ca = Ca::generate("mesh.test").unwrap();
    let (chain, key) = ca
        .issue(
            &SpiffeId::parse("spiffe://mesh.test/ns/a/sa/app").unwrap(),
            DEFAULT_LIFETIME,
        )
        .unwrap();
    let dir = write_identity(&chain, &key, ca.bundle_pem());
    let proxy = TestProxy::start(&format!(
        r#"identity: {{cert: {d}/cert.pem, key: {d}/key.pem, bundle: {d}/bundle.pem}}
xds: {{address: "{dead}"}}
tracing:
  service_name: app
  otlp_grpc: "{}"
admin:
  address: 127.0.0.1:0
listeners:
  - name: outbound
    address: 127.0.0.1:0
    direction: outbound
    virtual_hosts:
      - name: app
        domains: ['*']
        routes:
          - name: main
            retry: {{attempts: 1, on: [gateway-error]}}
            rate_limit: {{requests_per_second: 1000}}
            backends: [{{cluster: app}}]
  - name: inbound
    address: 127.0.0.1:0
    direction: inbound
    tls: {{mode: strict}}
    authorization: {{allow: ["spiffe://mesh.test/ns/a/*"]}}
    virtual_hosts: []
clusters:
  - name: app
    outlier: {{consecutive_5xx: 5}}
    endpoints: [{{address: "{}"}}]
"#,
        collector.addr,
        up.addr,
        d = dir.display(),
        dead = free_addr(),
    ))
    .await;
    let client = TestClient::http1(proxy.addr("outbound"));
    for i in 0..5 {
        let r = client
            .get("app", &format!("/fail/1/503/{i}"))
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    let page = get(proxy.admin(), "/metrics").await.body;
    let families = parse_with_prometheus_client(&page);
    for name in [
        "outrigger_requests",
        "outrigger_request_duration_seconds",
        "outrigger_retries",
        "outrigger_retry_backoff_seconds",
        "outrigger_retry_budget_exhausted",
        "outrigger_circuit_breaker_overflows",
        "outrigger_outlier_ejections",
        "outrigger_outlier_ejected_endpoints",
        "outrigger_rate_limited",
        "outrigger_connections",
        "outrigger_open_connections",
        "outrigger_tcp_bytes",
        "outrigger_tls_handshake_failures",
        "outrigger_authorization_denied",
        "outrigger_xds_version",
        "outrigger_xds_last_update_timestamp_seconds",
        "outrigger_xds_nacks",
        "outrigger_spans_exported",
        "outrigger_spans_dropped",
        "outrigger_config_reloads",
    ] {
        assert!(
            families.get(name).is_some(),
            "no family {name} in {families}"
        );
    }
    assert!(families["outrigger_requests"]["samples"].as_u64().unwrap() >= 1);
    // Every request was traced (sampling 1), so the latency buckets point at traces.
    let exemplars = families["outrigger_request_duration_seconds"]["exemplars"]
        .as_array()
        .unwrap();
    assert!(
        exemplars
            .iter()
            .any(|e| e["trace_id"].as_str().is_some_and(|t| t.len() == 32)),
        "{families}"
    );
}
