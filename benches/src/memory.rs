//! Memory per connection and per route, for ours beside Envoy and HAProxy.
//!
//! - **Connections.** Each proxy forwards to one nginx. The harness opens `--connections`
//!   connections (default 9,000: HAProxy wants two descriptors per connection, and the
//!   machines here allow 20,000) that send nothing, and reads the proxy's RSS once it holds
//!   them all; then sends one request on each, one at a time (so one upstream connection
//!   serves them all), and reads its RSS again, with every connection kept alive; and once
//!   more after they have all sat unused for 5 s. Per connection is (RSS then − RSS at
//!   start) / connections.
//! - **Routes.** Each proxy starts on a config of `--routes` virtual hosts (default 10,000),
//!   one route each, and on one of a single virtual host with that many routes. Per route is
//!   (RSS on that config − RSS on a one-route config) / routes. HAProxy has no routes to
//!   compare and is left out of these rows.
//!
//! `outrigger-bench memory [--connections N] [--routes N]`; JSON in `target/bench/memory.json`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{
    Target, free_port, memory_kib, run_args, spawn_envoy, spawn_outrigger, start_envoy,
    start_haproxy, start_outrigger, wait_for_port, write_json,
};

struct Sizes {
    connections: usize,
    routes: usize,
}

fn sizes(raw: &[String]) -> (Sizes, Vec<String>) {
    let mut sizes = Sizes {
        connections: 9_000,
        routes: 10_000,
    };
    let mut rest = Vec::new();
    let mut it = raw.iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--connections" => {
                sizes.connections = it.next().and_then(|v| v.parse().ok()).expect("N")
            }
            "--routes" => sizes.routes = it.next().and_then(|v| v.parse().ok()).expect("N"),
            _ => rest.push(flag.clone()),
        }
    }
    (sizes, rest)
}

/// Open file descriptors of a process: how many connections it holds.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Waits until `pid` holds `at_least` descriptors and its RSS has stopped moving.
fn settle(pid: u32, at_least: usize) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    while open_fds(pid) < at_least && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut last = memory_kib(pid, "VmRSS:");
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        let now = memory_kib(pid, "VmRSS:");
        if now == last {
            break;
        }
        last = now;
    }
    last
}

/// Reads one response with a `Content-Length` body off `stream`.
async fn read_response(stream: &mut TcpStream) -> bool {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let Ok(n) = stream.read(&mut chunk).await else {
            return false;
        };
        if n == 0 {
            return false;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return text.starts_with("HTTP/1.1 200");
            }
        }
    }
}

/// How long the keep-alive connections sit unused before the second reading: long enough
/// for a proxy that gives a quiet connection's buffers back to have done so.
const QUIET: Duration = Duration::from_secs(5);

/// KiB per connection: idle, kept alive just after its request, and kept alive after
/// `QUIET`; and the failed requests.
struct PerConnection {
    idle: f64,
    kept: f64,
    kept_quiet: f64,
    failed: usize,
}

async fn per_connection(target: &Target, n: usize) -> PerConnection {
    let pid = target.child.as_ref().expect("a process").id();
    let base_fds = open_fds(pid);
    let start = settle(pid, 0);
    let mut conns = Vec::with_capacity(n);
    for _ in 0..n {
        conns.push(TcpStream::connect(target.addr).await.expect("connect"));
    }
    let idle = settle(pid, base_fds + n);
    eprintln!(
        "  {} descriptors open after {n} connections (from {base_fds})",
        open_fds(pid)
    );
    // One request at a time, so that one upstream connection serves them all and what is
    // measured is the downstream connections' cost.
    let mut failed = 0;
    for c in &mut conns {
        let ok = c
            .write_all(b"GET / HTTP/1.1\r\nHost: memory\r\n\r\n")
            .await
            .is_ok()
            && read_response(c).await;
        failed += usize::from(!ok);
    }
    let kept = settle(pid, base_fds + n);
    tokio::time::sleep(QUIET).await;
    let kept_quiet = settle(pid, base_fds + n);
    drop(conns);
    let per = |kib: u64| kib.saturating_sub(start) as f64 * 1024.0 / n as f64 / 1024.0;
    PerConnection {
        idle: per(idle),
        kept: per(kept),
        kept_quiet: per(kept_quiet),
        failed,
    }
}

fn outrigger_routes(upstream: SocketAddr, n: usize, one_host: bool) -> (String, SocketAddr) {
    let (addr, admin) = (free_port(), free_port());
    let mut hosts = String::new();
    if one_host {
        hosts.push_str("      - name: all\n        domains: [\"*\"]\n        routes:\n");
        for i in 0..n {
            hosts.push_str(&format!(
                "          - match: {{prefix: \"/r{i}/\"}}\n            backends: [{{cluster: upstream}}]\n"
            ));
        }
    } else {
        for i in 0..n {
            hosts.push_str(&format!(
                "      - name: vh{i}\n        domains: [\"vh{i}.example\"]\n        routes:\n          - backends: [{{cluster: upstream}}]\n"
            ));
        }
    }
    let config = format!(
        "admin:\n  address: {admin}\nworkers: 1\nlisteners:\n  - name: bench\n    address: {addr}\n    direction: outbound\n    virtual_hosts:\n{hosts}clusters:\n  - name: upstream\n    endpoints: [{{address: \"{upstream}\"}}]\n"
    );
    (config, addr)
}

fn envoy_routes(upstream: SocketAddr, n: usize, one_host: bool) -> (String, SocketAddr) {
    let (addr, admin) = (free_port(), free_port());
    let route = |prefix: &str| {
        format!(
            "                  - match: {{prefix: \"{prefix}\"}}\n                    route: {{cluster: upstream}}\n"
        )
    };
    let mut hosts = String::new();
    if one_host {
        hosts.push_str("              - name: all\n                domains: [\"*\"]\n                routes:\n");
        for i in 0..n {
            hosts.push_str(&route(&format!("/r{i}/")));
        }
    } else {
        for i in 0..n {
            hosts.push_str(&format!(
                "              - name: vh{i}\n                domains: [\"vh{i}.example\"]\n                routes:\n{}",
                route("/")
            ));
        }
    }
    let config = format!(
        "admin:\n  address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}\nstatic_resources:\n  listeners:\n  - address: {{socket_address: {{address: 127.0.0.1, port_value: {}}}}}\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: bench\n          route_config:\n            virtual_hosts:\n{hosts}          http_filters:\n          - name: envoy.filters.http.router\n            typed_config:\n              \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n  clusters:\n  - name: upstream\n    connect_timeout: 1s\n    load_assignment:\n      cluster_name: upstream\n      endpoints:\n      - lb_endpoints:\n        - endpoint: {{address: {{socket_address: {{address: {}, port_value: {}}}}}}}\n",
        admin.port(),
        addr.port(),
        upstream.ip(),
        upstream.port()
    );
    (config, addr)
}

/// RSS (KiB) of a proxy started on a config, once it is up and settled.
fn rss_on(start: impl Fn() -> Target) -> u64 {
    let target = start();
    let pid = target.child.as_ref().expect("a process").id();
    wait_for_port(target.addr);
    settle(pid, 0)
}

type Starter<'a> = Box<dyn Fn() -> Target + 'a>;

pub(crate) fn run(raw: &[String]) {
    let (sizes, rest) = sizes(raw);
    let args = run_args(&rest);
    let dir = args.scratch("memory");
    let Some((upstream, _nginx)) = crate::wrk_nginx::start_nginx(&dir) else {
        eprintln!("nginx did not start (scripts/bench installs it)");
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    let mut table = String::new();
    table.push_str(&format!(
        "{:<12} {:>10} {:>14} {:>14} {:>16} {:>8} {:>16} {:>16}\n",
        "target",
        "start MB",
        "idle KB/conn",
        "kept KB/conn",
        "quiet 5s KB/conn",
        "failed",
        "KB/virtual host",
        "KB/route in one"
    ));
    let mut starts: Vec<(&str, Starter<'_>)> = vec![(
        "outrigger",
        Box::new(|| start_outrigger(&args.proxy_bin, upstream, &dir)),
    )];
    if let Some(envoy) = &args.envoy_bin {
        starts.push(("envoy", Box::new(|| start_envoy(envoy, upstream, &dir))));
    }
    if let Some(haproxy) = &args.haproxy_bin {
        starts.push((
            "haproxy 2.6",
            Box::new(|| start_haproxy(haproxy, upstream, &dir)),
        ));
    }
    for (name, start) in &starts {
        eprintln!("{name}: {} connections", sizes.connections);
        let target = start();
        let pid = target.child.as_ref().expect("a process").id();
        let start_kib = settle(pid, 0);
        let conn = runtime.block_on(per_connection(&target, sizes.connections));
        drop(target);
        let routes = |one_host: bool| -> Option<f64> {
            let n = sizes.routes;
            let (one, many) = match *name {
                "outrigger" => {
                    let spawn = |n: usize, tag: &str| {
                        let (config, addr) = outrigger_routes(upstream, n, one_host);
                        let path = dir.join(format!("routes-{tag}.yaml"));
                        rss_on(|| spawn_outrigger(&args.proxy_bin, &config, addr, &path))
                    };
                    (spawn(1, "one"), spawn(n, "many"))
                }
                "envoy" => {
                    let envoy = args.envoy_bin.as_ref()?;
                    let spawn = |n: usize, tag: &str| {
                        let (config, addr) = envoy_routes(upstream, n, one_host);
                        let path = dir.join(format!("envoy-routes-{tag}.yaml"));
                        rss_on(|| spawn_envoy(envoy, &config, addr, &path))
                    };
                    (spawn(1, "one"), spawn(n, "many"))
                }
                _ => return None,
            };
            Some(many.saturating_sub(one) as f64 * 1024.0 / n as f64 / 1024.0)
        };
        eprintln!("{name}: {} routes", sizes.routes);
        let (per_host, per_route) = (routes(false), routes(true));
        let kb = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        table.push_str(&format!(
            "{:<12} {:>10.1} {:>14.2} {:>14.2} {:>16.2} {:>8} {:>16} {:>16}\n",
            name,
            start_kib as f64 / 1024.0,
            conn.idle,
            conn.kept,
            conn.kept_quiet,
            conn.failed,
            kb(per_host),
            kb(per_route)
        ));
        rows.push(json!({
            "target": name,
            "start_rss_kib": start_kib,
            "connections": sizes.connections,
            "idle_kib_per_connection": conn.idle,
            "keepalive_kib_per_connection": conn.kept,
            "keepalive_quiet_kib_per_connection": conn.kept_quiet,
            "quiet_seconds": QUIET.as_secs(),
            "failed_requests": conn.failed,
            "routes": sizes.routes,
            "kib_per_virtual_host": per_host,
            "kib_per_route_in_one_host": per_route,
        }));
    }
    println!("\n{table}");
    write_json(
        &args.out_dir,
        "memory.json",
        &json!({
            "command": std::env::args().collect::<Vec<_>>().join(" "),
            "rows": rows,
        }),
    );
    let _ = std::fs::remove_dir_all(&dir);
}
