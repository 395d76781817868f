//! Micro-benchmarks of what every request runs: routing (at scale), the rewrite of a request
//! for its endpoint, the balancer's pick, and recording the request's metrics. A regression
//! in one of them shows here as a number before it is lost in the noise of `scripts/bench`.
//!
//! `cargo bench -p outrigger-proxy` (criterion; reports under `target/criterion`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::Request;
use http_body_util::{BodyExt, Empty};
use outrigger_proxy::cluster::balance::UpstreamProtocol;
use outrigger_proxy::config::snapshot::RuntimeConfig;
use outrigger_proxy::route::router::{RouteOutcome, route};
use outrigger_proxy::stack::headers::rewrite_request;
use outrigger_proxy::telemetry::metrics::Metrics;
use outrigger_proxy::telemetry::route_series::Outcome;

/// A listener with `hosts` virtual hosts of `routes` prefix routes each, and one cluster of
/// `endpoints` endpoints.
fn config(hosts: usize, routes: usize, endpoints: usize) -> RuntimeConfig {
    let mut text = String::from(
        "listeners:\n  - name: l\n    address: 127.0.0.1:1\n    direction: outbound\n    virtual_hosts:\n",
    );
    for h in 0..hosts {
        text.push_str(&format!(
            "      - name: vh{h}\n        domains: [\"vh{h}.example\"]\n        routes:\n"
        ));
        for r in 0..routes {
            text.push_str(&format!(
                "          - match: {{prefix: \"/r{r}/\"}}\n            backends: [{{cluster: c}}]\n"
            ));
        }
    }
    text.push_str("clusters:\n  - name: c\n    endpoints:\n");
    for e in 0..endpoints {
        text.push_str(&format!(
            "      - {{address: \"127.0.0.{}:80\"}}\n",
            e % 250 + 1
        ));
    }
    RuntimeConfig::build("bench.yaml", &text, 1, None).expect("a valid config")
}

fn request(host: &str, path: &str) -> http::request::Parts {
    let (parts, ()) = Request::get(path)
        .header(http::header::HOST, host)
        .header("user-agent", "bench")
        .header("accept", "*/*")
        .body(())
        .unwrap()
        .into_parts();
    parts
}

fn routing(c: &mut Criterion) {
    for (hosts, routes) in [(1, 1), (10_000, 1), (1, 1_000)] {
        let config = config(hosts, routes, 1);
        let listener = &config.listeners[0];
        let host = format!("vh{}.example", hosts - 1);
        let parts = request(&host, &format!("/r{}/x", routes - 1));
        c.bench_function(
            &format!("route {hosts} hosts x {routes} routes, last"),
            |b| {
                b.iter(|| {
                    let found = route(
                        &listener.domains,
                        &listener.virtual_hosts,
                        &host,
                        std::hint::black_box(&parts),
                    );
                    assert!(matches!(found, RouteOutcome::Matched(..)));
                })
            },
        );
    }
}

fn rewriting(c: &mut Criterion) {
    let config = config(1, 1, 1);
    let route = &config.listeners[0].virtual_hosts[0].routes[0];
    c.bench_function("rewrite request for an HTTP/1.1 endpoint", |b| {
        b.iter(|| {
            let parts = request("vh0.example", "/r0/x?q=1");
            let body = Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed();
            let mut req = Request::from_parts(parts, body);
            rewrite_request(
                &mut req,
                route,
                "vh0.example",
                UpstreamProtocol::Http1,
                false,
            )
            .unwrap();
            req
        })
    });
}

fn balancing(c: &mut Criterion) {
    let config = config(1, 1, 100);
    let cluster = &config.clusters["c"];
    c.bench_function("pick among 100 endpoints", |b| {
        b.iter(|| cluster.pick().expect("an endpoint"))
    });
}

fn recording(c: &mut Criterion) {
    let metrics = Metrics::new();
    let series = metrics.route_series("outbound", &Arc::from("vh0/0"));
    let peer: Arc<str> = Arc::from("spiffe://cluster.local/ns/a/sa/b");
    c.bench_function("record a request's metrics", |b| {
        b.iter(|| {
            metrics.record_request(
                &series,
                Outcome {
                    status: 200,
                    grpc_status: None,
                    peer: Some(peer.clone()),
                    elapsed: Duration::from_micros(700),
                    trace_id: None,
                },
            )
        })
    });
}

criterion_group!(
    name = hot_paths;
    config = Criterion::default().measurement_time(Duration::from_secs(3));
    targets = routing, rewriting, balancing, recording
);
criterion_main!(hot_paths);
