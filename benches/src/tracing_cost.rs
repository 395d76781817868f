//! The "tracing" scenario: what a span per request costs, and what a dead collector costs.
//!
//! The same fixed-rate HTTP/1.1 load goes through our proxy with tracing off, with tracing at
//! 100 % to a collector that answers, and at 100 % to a collector that accepts connections
//! and never answers (black-holed). Envoy runs off and with its OpenTelemetry tracer at 100 %
//! to the same answering collector. The point is p99 and CPU µs per request side by side,
//! and that the black-holed collector leaves requests alone while spans are dropped and
//! counted.
//!
//! `outrigger-bench tracing [--duration SECONDS] [--rate RPS]`

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;

use crate::{
    RunArgs, Target, fixed_rate, free_port, run_args, run_h2load, serve_in_thread, spawn_envoy,
    spawn_outrigger, start_upstream, wait_for_port, write_json,
};

/// An OTLP/gRPC collector that accepts everything: one empty response message and
/// `grpc-status: 0` for every call.
fn start_sink() -> SocketAddr {
    serve_in_thread(|stream| async move {
        let svc =
            hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                let _ = req.into_body().collect().await;
                let mut trailers = hyper::HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().unwrap());
                let frames = vec![
                    Ok::<_, Infallible>(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))),
                    Ok(Frame::trailers(trailers)),
                ];
                let mut resp =
                    hyper::Response::new(StreamBody::new(futures_util::stream::iter(frames)));
                resp.headers_mut()
                    .insert("content-type", "application/grpc".parse().unwrap());
                Ok::<_, Infallible>(resp)
            });
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), svc)
            .await;
    })
}

/// A collector that takes connections and never says a word.
fn start_black_hole() -> SocketAddr {
    let listener = StdListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    addr
}

fn ours(
    addr: SocketAddr,
    admin: SocketAddr,
    upstream: SocketAddr,
    collector: Option<SocketAddr>,
) -> String {
    let tracing = collector.map_or(String::new(), |c| {
        format!("tracing:\n  service_name: bench\n  otlp_grpc: \"{c}\"\n")
    });
    format!(
        "{tracing}admin:\n  address: {admin}\nworkers: 1\nlisteners:\n  - name: bench\n    address: {addr}\n    direction: outbound\n    virtual_hosts:\n      - name: all\n        domains: [\"*\"]\n        routes: [{{backends: [{{cluster: upstream}}]}}]\nclusters:\n  - name: upstream\n    endpoints: [{{address: \"{upstream}\"}}]\n"
    )
}

fn socket(a: SocketAddr) -> String {
    format!(
        "{{socket_address: {{address: 127.0.0.1, port_value: {}}}}}",
        a.port()
    )
}

fn envoy(addr: SocketAddr, upstream: SocketAddr, collector: Option<SocketAddr>) -> String {
    let tracing = collector.map_or(String::new(), |_| {
        "                tracing:\n                  random_sampling: {value: 100}\n                  provider:\n                    name: envoy.tracers.opentelemetry\n                    typed_config:\n                      \"@type\": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig\n                      grpc_service: {envoy_grpc: {cluster_name: otel}}\n                      service_name: bench\n".to_string()
    });
    let otel_cluster = collector.map_or(String::new(), |c| {
        format!(
            "    - name: otel\n      type: STATIC\n      connect_timeout: 1s\n      typed_extension_protocol_options:\n        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:\n          \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions\n          explicit_http_config: {{http2_protocol_options: {{}}}}\n      load_assignment: {{cluster_name: otel, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {}}}}}]}}]}}\n",
            socket(c)
        )
    });
    format!(
        r#"admin:
  address: {admin}
static_resources:
  listeners:
    - name: bench
      address: {listen}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: bench
                codec_type: AUTO
{tracing}                route_config:
                  virtual_hosts: [{{name: all, domains: ["*"], routes: [{{match: {{prefix: "/"}}, route: {{cluster: upstream}}}}]}}]
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
    - name: upstream
      type: STATIC
      connect_timeout: 1s
      load_assignment: {{cluster_name: upstream, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {up}}}}}]}}]}}
{otel_cluster}"#,
        admin = socket(free_port()),
        listen = socket(addr),
        up = socket(upstream),
    )
}

/// The proxy's dropped-span count, from its admin endpoint.
fn dropped_spans(admin: SocketAddr) -> u64 {
    use std::io::{Read, Write};
    let mut text = String::new();
    if let Ok(mut conn) = std::net::TcpStream::connect(admin) {
        let _ = conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
        let _ = conn.read_to_string(&mut text);
    }
    text.lines()
        .filter(|l| l.starts_with("outrigger_spans_dropped_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

pub fn run(raw: &[String]) {
    let args = run_args(raw);
    let dir = args.scratch("trace");
    let RunArgs {
        duration,
        rate,
        proxy_bin,
        envoy_bin,
        out_dir,
        baseline_bin,
        ..
    } = args;
    let out_dir = out_dir.as_path();
    let upstream = start_upstream();
    let (sink, hole) = (start_sink(), start_black_hole());
    wait_for_port(upstream);
    wait_for_port(sink);

    let scenario = fixed_rate("tracing", rate, duration);
    type Start<'a> = Box<dyn Fn() -> (Target, Option<SocketAddr>) + 'a>;
    let mut runs: Vec<(&str, Start)> = Vec::new();
    let mut ours_runs = vec![
        ("outrigger, tracing off", &proxy_bin, None),
        ("outrigger, 100 %", &proxy_bin, Some(sink)),
        (
            "outrigger, 100 %, collector black-holed",
            &proxy_bin,
            Some(hole),
        ),
    ];
    if let Some(bin) = &baseline_bin {
        ours_runs.push(("outrigger (baseline), tracing off", bin, None));
        ours_runs.push(("outrigger (baseline), 100 %", bin, Some(sink)));
    }
    for (label, bin, collector) in ours_runs {
        let dir = &dir;
        runs.push((
            label,
            Box::new(move || {
                let (addr, admin) = (free_port(), free_port());
                let t = spawn_outrigger(
                    bin,
                    &ours(addr, admin, upstream, collector),
                    addr,
                    &dir.join("ours.yaml"),
                );
                (t, Some(admin))
            }),
        ));
    }
    if let Some(envoy_bin) = &envoy_bin {
        for (label, collector) in [("envoy, tracing off", None), ("envoy, 100 %", Some(sink))] {
            let dir = &dir;
            runs.push((
                label,
                Box::new(move || {
                    let addr = free_port();
                    let t = spawn_envoy(
                        envoy_bin,
                        &envoy(addr, upstream, collector),
                        addr,
                        &dir.join("envoy.yaml"),
                    );
                    (t, None)
                }),
            ));
        }
    }

    let mut rows = Vec::new();
    let mut table = format!(
        "{:<42} {:>9} {:>9} {:>9} {:>11} {:>14}\n",
        "run", "req/s", "p50 ms", "p99 ms", "cpu µs/req", "spans dropped"
    );
    for (label, start) in &runs {
        let (target, admin) = start();
        std::thread::sleep(Duration::from_millis(500));
        eprintln!("running tracing: {label}");
        let m = run_h2load(&scenario, &target, &dir.join("h2load.log"));
        let dropped = admin.map(dropped_spans);
        table.push_str(&format!(
            "{:<42} {:>9.0} {:>9.3} {:>9.3} {:>11} {:>14}\n",
            label,
            m.rps,
            m.p50_ms,
            m.p99_ms,
            m.cpu_us_per_req.map_or("-".into(), |c| format!("{c:.1}")),
            dropped.map_or("-".into(), |d| d.to_string()),
        ));
        let mut row = m.row(json!({ "run": label }));
        row["spans_dropped"] = json!(dropped);
        row["h2load_args"] = json!(scenario.h2load.join(" "));
        rows.push(row);
    }
    println!("\n{table}");
    let doc = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "duration_s": duration,
        "fixed_rate_rps": rate,
        "rows": rows,
    });
    write_json(out_dir, "tracing.json", &doc);
    let _ = std::fs::remove_dir_all(&dir);
}
