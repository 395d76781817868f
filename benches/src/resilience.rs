//! The "resilience" scenario: three endpoints, one of which answers every tenth request
//! with 503, behind our proxy and behind Envoy with the same retry and outlier policy.
//!
//! Both retry gateway errors twice, with backoff from 25 ms to 250 ms, to another endpoint
//! where there is one, and eject an endpoint after 5 consecutive 5xx. The load is a fixed
//! rate, so CPU per request compares like with like. What the client sees is the point:
//! how many requests succeed, and what the retries cost in tail latency.
//!
//! `outrigger-bench resilience [--duration SECONDS] [--rate RPS]`

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;

use crate::{
    RunArgs, Target, fixed_rate, free_port, run_args, run_h2load, spawn_envoy, spawn_outrigger,
    start_upstream_failing, wait_for_port, write_json,
};

fn outrigger_config(addr: SocketAddr, admin: SocketAddr, endpoints: &[SocketAddr]) -> String {
    outrigger_endpoints_config(
        addr,
        admin,
        endpoints,
        "retry: {attempts: 2, on: [gateway-error], backoff_base: 25ms, backoff_max: 250ms}\n            ",
        "lb: round_robin\n    outlier: {consecutive_5xx: 5, base_ejection: 30s, max_ejection_percent: 50}\n    ",
    )
}

/// One listener routing everything to a cluster of `endpoints`, with `route` and `cluster`
/// lines (each ending in the indentation of the next key) for the policies under test.
pub(crate) fn outrigger_endpoints_config(
    addr: SocketAddr,
    admin: SocketAddr,
    endpoints: &[SocketAddr],
    route: &str,
    cluster: &str,
) -> String {
    let list: Vec<String> = endpoints
        .iter()
        .map(|e| format!("{{address: \"{e}\"}}"))
        .collect();
    format!(
        "admin:\n  address: {admin}\nworkers: 1\nlisteners:\n  - name: bench\n    address: {addr}\n    direction: outbound\n    virtual_hosts:\n      - name: all\n        domains: [\"*\"]\n        routes:\n          - {route}backends: [{{cluster: upstream}}]\nclusters:\n  - name: upstream\n    {cluster}endpoints: [{}]\n",
        list.join(", ")
    )
}

fn envoy_config(addr: SocketAddr, admin: SocketAddr, endpoints: &[SocketAddr]) -> String {
    envoy_endpoints_config(
        addr,
        admin,
        endpoints,
        "retry_on: gateway-error\n                              num_retries: 2\n                              retry_back_off: {base_interval: 0.025s, max_interval: 0.25s}\n                              host_selection_retry_max_attempts: 3",
        "ROUND_ROBIN",
        "{consecutive_5xx: 5, base_ejection_time: 30s, max_ejection_percent: 50}",
    )
}

/// Envoy with one listener routing everything to a static cluster of `endpoints`: `retry`
/// is the route's retry policy fields (previous-hosts is always added), `lb` the cluster's
/// `lb_policy`, `outlier` its `outlier_detection`.
pub(crate) fn envoy_endpoints_config(
    addr: SocketAddr,
    admin: SocketAddr,
    endpoints: &[SocketAddr],
    retry: &str,
    lb: &str,
    outlier: &str,
) -> String {
    let lb_endpoints: String = endpoints
        .iter()
        .map(|e| {
            format!(
                "              - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}}}\n",
                e.port()
            )
        })
        .collect();
    format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
static_resources:
  listeners:
    - name: bench
      address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: bench
                codec_type: AUTO
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes:
                        - match: {{prefix: "/"}}
                          route:
                            cluster: upstream
                            retry_policy:
                              {retry}
                              retry_host_predicate: [{{name: envoy.retry_host_predicates.previous_hosts, typed_config: {{"@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}}}}]
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: upstream
      type: STATIC
      lb_policy: {lb}
      connect_timeout: 1s
      outlier_detection: {outlier}
      load_assignment:
        cluster_name: upstream
        endpoints:
          - lb_endpoints:
{lb_endpoints}"#,
        admin_port = admin.port(),
        port = addr.port(),
    )
}

type Starter<'a> = Box<dyn Fn() -> Target + 'a>;

pub fn run(raw: &[String]) {
    let args = run_args(raw);
    let dir = args.scratch("res");
    let RunArgs {
        duration,
        rate,
        proxy_bin,
        envoy_bin: envoy,
        out_dir,
        ..
    } = args;
    let out_dir = out_dir.as_path();
    let endpoints = [
        start_upstream_failing(0),
        start_upstream_failing(0),
        start_upstream_failing(10),
    ];
    for e in endpoints {
        wait_for_port(e);
    }
    let scenario = fixed_rate("resilience", rate, duration);

    let mut targets: Vec<(&str, Starter)> = vec![(
        "outrigger",
        Box::new(|| {
            let (addr, admin) = (free_port(), free_port());
            spawn_outrigger(
                &proxy_bin,
                &outrigger_config(addr, admin, &endpoints),
                addr,
                &dir.join("outrigger.yaml"),
            )
        }),
    )];
    if let Some(envoy) = &envoy {
        targets.push((
            "envoy",
            Box::new(|| {
                let (addr, admin) = (free_port(), free_port());
                spawn_envoy(
                    envoy,
                    &envoy_config(addr, admin, &endpoints),
                    addr,
                    &dir.join("envoy.yaml"),
                )
            }),
        ));
    }

    let mut rows = Vec::new();
    let mut table = String::new();
    table.push_str(&format!(
        "{:<10} {:>9} {:>10} {:>9} {:>9} {:>11}\n",
        "target", "requests", "success %", "p50 ms", "p99 ms", "cpu µs/req"
    ));
    for (name, start) in &targets {
        let target = start();
        std::thread::sleep(Duration::from_millis(500));
        eprintln!("running resilience through {name}");
        let m = run_h2load(&scenario, &target, &dir.join("h2load.log"));
        let success = 100.0 * (m.requests - m.failed) as f64 / m.requests.max(1) as f64;
        table.push_str(&format!(
            "{:<10} {:>9} {:>10.3} {:>9.3} {:>9.3} {:>11}\n",
            name,
            m.requests,
            success,
            m.p50_ms,
            m.p99_ms,
            m.cpu_us_per_req.map_or("-".into(), |c| format!("{c:.1}"))
        ));
        rows.push(json!({
            "scenario": "resilience",
            "target": name,
            "requests": m.requests,
            "failed": m.failed,
            "success_percent": success,
            "p50_ms": m.p50_ms,
            "p99_ms": m.p99_ms,
            "cpu_us_per_request": m.cpu_us_per_req,
            "h2load_args": scenario.h2load.join(" "),
        }));
    }
    println!("\n{table}");
    let doc = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "duration_s": duration,
        "fixed_rate_rps": rate,
        "endpoints": 3,
        "failing": "one endpoint answers every 10th request with 503",
        "rows": rows,
    });
    write_json(out_dir, "resilience.json", &doc);
    let _ = std::fs::remove_dir_all(&dir);
}
