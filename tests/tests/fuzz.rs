//! Property tests over the parsers that take input from the wire, a file or the control
//! plane: protocol detection, trace-context headers, the mesh file, the proxy's config
//! file, and the xDS resources the proxy translates. Each runs a fixed number of generated
//! cases (bounded time in CI); an input that once crashed one is kept as a plain test below.
//!
//! The property is the same everywhere: any input gives an answer or an error, never a
//! panic, and an accepted mesh translates.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use http::{HeaderMap, HeaderName, HeaderValue};
use outrigger_proxy::net::detect;
use outrigger_proxy::telemetry::trace_context;
use outrigger_proxy::xds::translate as xds_translate;
use proptest::prelude::*;
use prost::Message;

fn config() -> ProptestConfig {
    // Enough to find shallow crashes in seconds; set PROPTEST_CASES for a longer run.
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2000),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Text made of the words the parsers know, so that cases reach past the first error.
fn yamlish(words: &'static [&'static str]) -> impl Strategy<Value = String> {
    let token = prop_oneof![
        proptest::sample::select(words).prop_map(str::to_string),
        "[ :\\-\\[\\]{},\n\"'*./0-9a-z]{0,6}",
    ];
    proptest::collection::vec(token, 0..60).prop_map(|t| t.concat())
}

const MESH_WORDS: &[&str] = &[
    "mesh:",
    "services:",
    "\n  - name: ",
    "\n    ",
    "port: ",
    "protocol: ",
    "http",
    "grpc",
    "endpoints: [{address: \"127.0.0.1:80\"}]",
    "routes:",
    "\n      - ",
    "match: ",
    "prefix: /",
    "regex: ",
    "backends: [{service: a, weight: 1}]",
    "timeout: 1s",
    "retry: {attempts: 2}",
    "policy:",
    "outlier: {consecutive_5xx: 5}",
    "rate_limit: {requests_per_second: 1}",
    "calls: [a]",
    "mtls: true",
    "tokens: [{token: t}]",
    "addresses: [10.0.0.1]",
    "a",
    "b",
    "trust_domain: x",
    "namespace: n",
    "18446744073709551615",
    "-1",
    "0",
    "ms",
    "h",
];

const PROXY_WORDS: &[&str] = &[
    "admin:",
    "listeners:",
    "\n  - name: l",
    "\n    ",
    "address: 127.0.0.1:0",
    "direction: ",
    "inbound",
    "outbound",
    "protocol: ",
    "opaque",
    "detect",
    "virtual_hosts:",
    "domains: ['*']",
    "routes:",
    "\n      - ",
    "backends: [{cluster: c}]",
    "clusters:",
    "endpoints: [{address: \"127.0.0.1:9\"}]",
    "timeout: ",
    "idle_timeout: ",
    "retry: {attempts: 3, on: [reset]}",
    "99999999999h",
    "1s",
    "rate_limit: {requests_per_second: 0}",
    "tls: {mode: strict}",
    "authorization: {default: deny}",
    "tcp: {cluster: c}",
    "outlier: {base_ejection: 18446744073709551615s}",
    "lb: round_robin",
];

#[test]
fn protocol_detection_classifies_any_bytes() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    proptest!(config(), |(bytes in proptest::collection::vec(any::<u8>(), 0..256))| {
        let (_, mut replay) = rt
            .block_on(async {
                let deadline = tokio::time::Instant::now() + Duration::from_millis(50);
                detect::detect(&bytes[..], deadline).await
            })
            .unwrap();
        // Whatever was read is handed on intact.
        let mut again = Vec::new();
        rt.block_on(tokio::io::AsyncReadExt::read_to_end(&mut replay, &mut again)).unwrap();
        prop_assert_eq!(again, bytes);
    });
}

#[test]
fn trace_context_headers_never_panic() {
    let names = [
        "traceparent",
        "tracestate",
        "b3",
        "x-b3-traceid",
        "x-b3-spanid",
        "x-b3-sampled",
        "x-b3-parentspanid",
    ];
    proptest!(config(), |(values in proptest::collection::vec((0..names.len(), "[ -~]{0,80}"), 0..6))| {
        let mut headers = HeaderMap::new();
        for (i, v) in values {
            if let Ok(v) = HeaderValue::from_str(&v) {
                headers.append(HeaderName::from_static(names[i]), v);
            }
        }
        if let Some(ctx) = trace_context::extract(&headers) {
            let mut out = HeaderMap::new();
            trace_context::inject(&mut out, &ctx.child());
            prop_assert!(trace_context::extract(&out).is_some());
        }
    });
}

#[test]
fn the_mesh_file_parser_answers_anything() {
    proptest!(config(), |(text in yamlish(MESH_WORDS))| {
        if let Ok(mesh) = outrigger_control_plane::mesh::Mesh::parse("fuzz.yaml", &text) {
            let _ = outrigger_control_plane::translate::translate(&mesh);
        }
    });
}

#[test]
fn the_proxy_config_parser_answers_anything() {
    proptest!(config(), |(text in yamlish(PROXY_WORDS))| {
        let _ = outrigger_proxy::config::snapshot::RuntimeConfig::build("fuzz.yaml", &text, 1, None);
    });
}

#[test]
fn xds_translation_answers_any_resource() {
    proptest!(config(), |(bytes in proptest::collection::vec(any::<u8>(), 0..512))| {
        if let Ok(c) = Cluster::decode(&bytes[..]) {
            let _ = xds_translate::cluster(&c);
        }
        if let Ok(cla) = ClusterLoadAssignment::decode(&bytes[..]) {
            let _ = xds_translate::endpoints(&cla);
        }
        if let Ok(rc) = RouteConfiguration::decode(&bytes[..]) {
            let _ = xds_translate::route_table(&rc);
        }
    });
}

/// Translation of well-formed resources with extreme values (generated bytes rarely decode
/// into deep messages): durations at the limits of protobuf's range.
#[test]
fn xds_durations_at_the_limits_are_clamped() {
    use envoy_types::pb::google::protobuf::Duration as PbDuration;
    proptest!(config(), |(seconds in any::<i64>(), nanos in any::<i32>())| {
        let c = Cluster {
            name: "c".into(),
            connect_timeout: Some(PbDuration { seconds, nanos }),
            ..Default::default()
        };
        let _ = xds_translate::cluster(&c);
    });
}
