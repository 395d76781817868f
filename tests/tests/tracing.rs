//! Traces over real sockets into a real OTLP receiver (the official opentelemetry-proto
//! service): app A → sidecar A → sidecar B → app B is one trace, parented under A's own
//! span; retries show as attempt spans; B3 in, W3C out; a dead collector costs nothing.

use std::net::SocketAddr;
use std::time::Duration;

use http::Method;
use outrigger_tests::clients::{TestClient, get};
use outrigger_tests::otlp::{self, Received, Spans};
use outrigger_tests::{TestProxy, eventually, faults, metric, upstreams};

const APP_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const APP_SPAN: &str = "00f067aa0ba902b7";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn tracing_block(service: &str, collector: &str) -> String {
    format!(
        r#"tracing:
  service_name: {service}
  {collector}
"#
    )
}

async fn sidecar(tracing: &str, direction: &str, to: SocketAddr, retry: &str) -> TestProxy {
    TestProxy::start(&format!(
        r#"{tracing}admin:
  address: 127.0.0.1:0
listeners:
  - name: {direction}
    address: 127.0.0.1:0
    direction: {direction}
    virtual_hosts:
      - name: app
        domains: ['*']
        routes:
          - name: main
{retry}            backends: [{{cluster: next}}]
clusters:
  - name: next
    lb: round_robin
    endpoints: [{{address: "{to}"}}]
"#
    ))
    .await
}

async fn spans_at_least(spans: &Spans, n: usize) -> Vec<Received> {
    eventually(
        &format!("{n} spans at the collector"),
        Duration::from_secs(10),
        || async {
            let got = spans.lock().unwrap().clone();
            (got.len() >= n).then_some(got)
        },
    )
    .await
}

fn find<'a>(spans: &'a [Received], service: &str, name_prefix: &str) -> Vec<&'a Received> {
    spans
        .iter()
        .filter(|r| r.service == service && r.span.name.starts_with(name_prefix))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_across_two_sidecars_over_otlp_grpc() {
    let (collector, spans) = otlp::grpc_receiver().await;
    let grpc = format!("otlp_grpc: \"{}\"", collector.addr);
    one_trace_across_two_sidecars(&grpc, &spans).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_across_two_sidecars_over_otlp_http() {
    let (collector, spans) = otlp::http_receiver().await;
    let http = format!("otlp_http: \"http://{}/v1/traces\"", collector.addr);
    one_trace_across_two_sidecars(&http, &spans).await;
}

/// app A → sidecar A → sidecar B → app B, with A's own traceparent: one trace, each span
/// under the one before it, with the HTTP conventions and the proxy's attributes.
async fn one_trace_across_two_sidecars(collector: &str, spans: &Spans) {
    let app_b = upstreams::http("b").await;
    let b = sidecar(&tracing_block("b", collector), "inbound", app_b.addr, "").await;
    let a = sidecar(
        &tracing_block("a", collector),
        "outbound",
        b.addr("inbound"),
        "",
    )
    .await;
    let traceparent = format!("00-{APP_TRACE}-{APP_SPAN}-01");
    let r = TestClient::http1(a.addr("outbound"))
        .send(
            Method::GET,
            "b.test",
            "/hello",
            &[("traceparent", &traceparent)],
            "",
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);

    let all = spans_at_least(spans, 4).await;
    assert!(
        all.iter().all(|s| hex(&s.span.trace_id) == APP_TRACE),
        "one trace: {all:#?}"
    );
    let a_request = find(&all, "a", "GET main")[0];
    let a_attempt = find(&all, "a", "attempt 1")[0];
    let b_request = find(&all, "b", "GET main")[0];
    let b_attempt = find(&all, "b", "attempt 1")[0];
    // A's span hangs under the app's; each hop under the one before it.
    assert_eq!(hex(&a_request.span.parent_span_id), APP_SPAN);
    assert_eq!(a_attempt.span.parent_span_id, a_request.span.span_id);
    assert_eq!(b_request.span.parent_span_id, a_attempt.span.span_id);
    assert_eq!(b_attempt.span.parent_span_id, b_request.span.span_id);
    // App B's parent is B's attempt.
    let seen = r.header("x-echo-traceparent").unwrap();
    assert_eq!(
        seen,
        format!("00-{APP_TRACE}-{}-01", hex(&b_attempt.span.span_id))
    );
    // Client on the outbound side, server on the inbound side, with the HTTP conventions.
    assert_eq!((a_request.span.kind, b_request.span.kind), (3, 2));
    assert_eq!(
        a_request.attr("http.request.method").as_deref(),
        Some("GET")
    );
    assert_eq!(a_request.attr("http.route").as_deref(), Some("main"));
    assert_eq!(
        a_request.attr("http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(a_request.attr("server.address").as_deref(), Some("b.test"));
    assert!(b_request.attr("network.peer.address").is_some());
    assert_eq!(
        a_attempt.attr("outrigger.upstream.endpoint"),
        Some(b.addr("inbound").to_string())
    );
    // Counted once the collector's answer is back, just after it stored the spans.
    let admin = a.admin();
    eventually(
        "exported spans are counted",
        Duration::from_secs(5),
        || async move {
            let page = get(admin, "/metrics").await.body;
            (metric(&page, "outrigger_spans_exported_total") >= 2).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_shows_as_a_second_attempt_span_with_its_backoff() {
    let (collector, spans) = otlp::grpc_receiver().await;
    let grpc = format!("otlp_grpc: \"{}\"", collector.addr);
    let (up, _) = faults::faulty("b").await;
    let a = sidecar(
        &tracing_block("a", &grpc),
        "outbound",
        up.addr,
        "            retry: {attempts: 2, on: [gateway-error]}\n",
    )
    .await;
    let r = TestClient::http1(a.addr("outbound"))
        .get("b.test", "/fail/1/503/x")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let all = spans_at_least(&spans, 3).await;
    let request = find(&all, "a", "GET main")[0];
    let (first, second) = (
        find(&all, "a", "attempt 1")[0],
        find(&all, "a", "attempt 2")[0],
    );
    for attempt in [first, second] {
        assert_eq!(attempt.span.parent_span_id, request.span.span_id);
    }
    assert_eq!(
        first.attr("http.response.status_code").as_deref(),
        Some("503")
    );
    assert_eq!(
        second.attr("http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(second.attr("outrigger.attempt").as_deref(), Some("2"));
    assert!(second.attr("outrigger.backoff_ms").is_some(), "{second:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_over_http_and_b3_in_w3c_out() {
    let (collector, spans) = otlp::http_receiver().await;
    let http = format!("otlp_http: \"http://{}/v1/traces\"", collector.addr);
    let app = upstreams::http("b").await;
    let a = sidecar(&tracing_block("a", &http), "outbound", app.addr, "").await;
    let r = TestClient::http1(a.addr("outbound"))
        .send(
            Method::GET,
            "b.test",
            "/",
            &[
                ("x-b3-traceid", APP_TRACE),
                ("x-b3-spanid", APP_SPAN),
                ("x-b3-sampled", "1"),
            ],
            "",
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    // Continued, not restarted: the app sees W3C in the caller's trace, and no stale B3.
    let tp = r.header("x-echo-traceparent").unwrap();
    assert!(tp.starts_with(&format!("00-{APP_TRACE}-")), "{tp}");
    assert_eq!(r.header("x-echo-x-b3-spanid"), None);
    let all = spans_at_least(&spans, 2).await;
    let request = find(&all, "a", "GET main")[0];
    assert_eq!(hex(&request.span.trace_id), APP_TRACE);
    assert_eq!(hex(&request.span.parent_span_id), APP_SPAN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_drops_and_counts_spans_and_requests_carry_on() {
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let app = upstreams::http("b").await;
    let a = sidecar(
        &tracing_block("a", &format!("otlp_grpc: \"{dead}\"\n  queue: 4")),
        "outbound",
        app.addr,
        "",
    )
    .await;
    let client = TestClient::http1(a.addr("outbound"));
    for _ in 0..200 {
        assert_eq!(client.get("b.test", "/").await.unwrap().status, 200);
    }
    let admin = a.admin();
    eventually(
        "dropped spans are counted",
        Duration::from_secs(10),
        || async move {
            let page = get(admin, "/metrics").await.body;
            let dropped = metric(
                &page,
                "outrigger_spans_dropped_total{reason=\"queue_full\"}",
            ) + metric(
                &page,
                "outrigger_spans_dropped_total{reason=\"export_failed\"}",
            );
            (dropped >= 300).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sampling_ratio_is_set_centrally_in_the_mesh() {
    use outrigger_control_plane::app;
    let (collector, spans) = otlp::grpc_receiver().await;
    let app_b = upstreams::http("b").await;
    let mesh = |ratio: &str| {
        format!(
            r#"mesh: {{tracing: {{sampling: {ratio}}}}}
services:
  - name: b
    endpoints: [{{address: "{}"}}]
"#,
            app_b.addr
        )
    };
    let path = outrigger_tests::temp_path("mesh.yaml");
    std::fs::write(&path, mesh("0")).unwrap();
    let cp = app::start(app::Options {
        mesh_path: path.clone(),
        xds_address: "127.0.0.1:0".parse().unwrap(),
        admin_address: "127.0.0.1:0".parse().unwrap(),
        identity: Default::default(),
        load_reports: Default::default(),
    })
    .await
    .unwrap();
    // The proxy's own ratio would sample everything; the mesh says otherwise.
    let a = TestProxy::start(&format!(
        "{}{}",
        tracing_block("a", &format!("otlp_grpc: \"{}\"", collector.addr)),
        outrigger_tests::xds_config(&format!("address: \"{}\"\nnode: a", cp.xds_addr))
    ))
    .await;
    let client = TestClient::http1(a.addr("outbound"));
    eventually("routes arrive", Duration::from_secs(10), || async {
        (client.get("b", "/").await.ok()?.status == 200).then_some(())
    })
    .await;
    for _ in 0..20 {
        assert_eq!(client.get("b", "/").await.unwrap().status, 200);
    }
    let exported = |admin| async move {
        metric(
            &get(admin, "/metrics").await.body,
            "outrigger_spans_exported_total",
        )
    };
    assert_eq!(exported(a.admin()).await, 0, "sampling 0: no spans");
    assert!(spans.lock().unwrap().is_empty());

    std::fs::write(&path, mesh("1")).unwrap();
    eventually(
        "spans once the mesh samples everything",
        Duration::from_secs(10),
        || {
            let client = client.clone();
            let spans = spans.clone();
            async move {
                client.get("b", "/").await.ok()?;
                (!spans.lock().unwrap().is_empty()).then_some(())
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mtls_the_inbound_span_names_the_callers_identity() {
    use outrigger_control_plane::ca::{Ca, DEFAULT_LIFETIME};
    use outrigger_core::spiffe::SpiffeId;
    let ca = Ca::generate("mesh.test").unwrap();
    let identity = |id: &str| {
        let (chain, key) = ca
            .issue(&SpiffeId::parse(id).unwrap(), DEFAULT_LIFETIME)
            .unwrap();
        outrigger_tests::identity_yaml(&outrigger_tests::write_identity(
            &chain,
            &key,
            ca.bundle_pem(),
        ))
    };
    let (web, api) = (
        "spiffe://mesh.test/ns/shop/sa/web",
        "spiffe://mesh.test/ns/shop/sa/api",
    );
    let (collector, spans) = otlp::grpc_receiver().await;
    let grpc = format!("otlp_grpc: \"{}\"", collector.addr);
    let app_b = upstreams::http("b").await;
    let b = TestProxy::start(&format!(
        r#"{}{}listeners:
  - name: inbound
    address: 127.0.0.1:0
    direction: inbound
    tls: {{mode: strict}}
    virtual_hosts:
      - name: app
        domains: ['*']
        routes: [{{name: main, backends: [{{cluster: app}}]}}]
clusters:
  - name: app
    endpoints: [{{address: "{}"}}]
"#,
        identity(api),
        tracing_block("b", &grpc),
        app_b.addr
    ))
    .await;
    let a = TestProxy::start(&format!(
        r#"{}{}listeners:
  - name: outbound
    address: 127.0.0.1:0
    direction: outbound
    virtual_hosts:
      - name: app
        domains: ['*']
        routes: [{{name: main, backends: [{{cluster: b}}]}}]
clusters:
  - name: b
    tls: {{identities: ["{api}"]}}
    endpoints: [{{address: "{}"}}]
"#,
        identity(web),
        tracing_block("a", &grpc),
        b.addr("inbound")
    ))
    .await;
    let r = TestClient::http1(a.addr("outbound"))
        .get("b.test", "/")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let all = spans_at_least(&spans, 4).await;
    let b_request = find(&all, "b", "GET main")[0];
    assert_eq!(
        b_request.attr("outrigger.peer.identity").as_deref(),
        Some(web)
    );
    let a_attempt = find(&all, "a", "attempt 1")[0];
    assert_eq!(b_request.span.parent_span_id, a_attempt.span.span_id);
}
