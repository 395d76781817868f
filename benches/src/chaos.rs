//! The "chaos" scenario: three endpoints behind one proxy worker, a fixed-rate load, and a
//! fault in the middle, through ours with nothing but the endpoints configured (its
//! defaults) and through Envoy configured as Istio's sidecar would be (2 retries to other
//! hosts, ejection after 5 consecutive 5xx, least-request).
//!
//! - kill-one: one endpoint dies (its listener and connections close) for 7 s, then comes back;
//! - flaky-one: one endpoint answers every tenth request with 503;
//! - all-fail: every endpoint answers 503 for 10 s;
//! - slow-one: one endpoint answers 300 ms late.
//!
//! Per scenario and proxy: client failures, upstream attempts per client request (over the run
//! and, for all-fail, inside the fault window), p50 and p99, how long the restarted endpoint
//! waited for its first request, and proxy CPU per request.
//!
//! `outrigger-bench chaos [--duration SECONDS] [--rate RPS]` (default 20 s at 1,000 req/s)

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::sync::watch;

use crate::resilience::{envoy_endpoints_config, outrigger_endpoints_config};
use crate::{
    RunArgs, Target, fixed_rate, free_port, run_args, run_h2load, spawn_envoy, spawn_outrigger,
    wait_for_port, write_json,
};

const NORMAL: u8 = 0;
const FAIL_ALL: u8 = 1;
const FLAKY: u8 = 2;
const SLOW: u8 = 3;

/// One endpoint whose behaviour, and life, the scenario controls.
struct Endpoint {
    addr: SocketAddr,
    mode: Arc<AtomicU8>,
    requests: Arc<AtomicU64>,
    alive: watch::Sender<bool>,
    /// When it was last brought back, and when its first request after that arrived.
    back_at: Arc<Mutex<Option<Instant>>>,
    first_after_back: Arc<Mutex<Option<Instant>>>,
}

impl Endpoint {
    fn start() -> Endpoint {
        let addr = free_port();
        let (alive, mut alive_rx) = watch::channel(true);
        let mode = Arc::new(AtomicU8::new(NORMAL));
        let requests = Arc::new(AtomicU64::new(0));
        let back_at = Arc::new(Mutex::new(None));
        let first_after_back = Arc::new(Mutex::new(None));
        let (m, r, f) = (mode.clone(), requests.clone(), first_after_back.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let body = Bytes::from(vec![b'x'; 128]);
                loop {
                    while !*alive_rx.borrow_and_update() {
                        if alive_rx.changed().await.is_err() {
                            return;
                        }
                    }
                    let Ok(listener) = tokio::net::TcpListener::bind(addr).await else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let for_connections = alive_rx.clone();
                    loop {
                        tokio::select! {
                            accepted = listener.accept() => {
                                let Ok((stream, _)) = accepted else { continue };
                                let _ = stream.set_nodelay(true);
                                let (m, r, f, body) = (m.clone(), r.clone(), f.clone(), body.clone());
                                let mut alive = for_connections.clone();
                                tokio::spawn(async move {
                                    let svc = service_fn(move |_req| {
                                        let (m, body) = (m.clone(), body.clone());
                                        let n = r.fetch_add(1, Ordering::Relaxed) + 1;
                                        let mut first = f.lock().unwrap();
                                        if first.is_none() {
                                            *first = Some(Instant::now());
                                        }
                                        drop(first);
                                        async move {
                                            let mode = m.load(Ordering::Relaxed);
                                            if mode == SLOW {
                                                tokio::time::sleep(Duration::from_millis(300)).await;
                                            }
                                            let mut resp = hyper::Response::new(Full::new(body));
                                            if mode == FAIL_ALL || (mode == FLAKY && n % 10 == 0) {
                                                *resp.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                                            }
                                            Ok::<_, Infallible>(resp)
                                        }
                                    });
                                    let conn = hyper::server::conn::http1::Builder::new()
                                        .serve_connection(TokioIo::new(stream), svc);
                                    tokio::select! {
                                        _ = conn => {}
                                        // Killed: the connection goes with the process.
                                        _ = alive.wait_for(|a| !*a) => {}
                                    }
                                });
                            }
                            _ = alive_rx.wait_for(|a| !*a) => break,
                        }
                    }
                }
            });
        });
        wait_for_port(addr);
        Endpoint {
            addr,
            mode,
            requests,
            alive,
            back_at,
            first_after_back,
        }
    }

    fn kill(&self) {
        let _ = self.alive.send(false);
    }

    fn restart(&self) {
        *self.first_after_back.lock().unwrap() = None;
        let _ = self.alive.send(true);
        wait_for_port(self.addr);
        // The bench's own check connection is not a request; the first request is.
        *self.back_at.lock().unwrap() = Some(Instant::now());
    }

    fn reset(&self) {
        self.mode.store(NORMAL, Ordering::Relaxed);
        let _ = self.alive.send(true);
        wait_for_port(self.addr);
        *self.back_at.lock().unwrap() = None;
    }
}

/// Nothing but the endpoints: the defaults are what is measured.
fn outrigger_config(addr: SocketAddr, admin: SocketAddr, endpoints: &[SocketAddr]) -> String {
    outrigger_endpoints_config(addr, admin, endpoints, "", "")
}

/// Envoy as Istio's sidecar would be set up: 2 retries on connect-failure, refused-stream,
/// unavailable, cancelled and 503, to other hosts; ejection after 5 consecutive 5xx;
/// least-request.
fn envoy_config(addr: SocketAddr, admin: SocketAddr, endpoints: &[SocketAddr]) -> String {
    envoy_endpoints_config(
        addr,
        admin,
        endpoints,
        "retry_on: connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes\n                              retriable_status_codes: [503]\n                              num_retries: 2\n                              host_selection_retry_max_attempts: 5",
        "LEAST_REQUEST",
        "{consecutive_5xx: 5}",
    )
}

type Starter<'a> = Box<dyn Fn() -> Target + 'a>;

const SCENARIOS: [&str; 4] = ["kill-one", "flaky-one", "all-fail", "slow-one"];

pub fn run(raw: &[String]) {
    let mut args = run_args(raw);
    if !raw.iter().any(|a| a == "--duration") {
        args.duration = 20;
    }
    // The faults must end inside the run: a quarter in, plus 10 s.
    if args.duration < 16 {
        eprintln!(
            "--duration {} is too short for the faults; using 16",
            args.duration
        );
        args.duration = 16;
    }
    let dir = args.scratch("chaos");
    let RunArgs {
        duration,
        rate,
        proxy_bin,
        envoy_bin: envoy,
        out_dir,
        ..
    } = args;
    let endpoints: Vec<Endpoint> = (0..3).map(|_| Endpoint::start()).collect();
    let addrs: Vec<SocketAddr> = endpoints.iter().map(|e| e.addr).collect();
    let mut targets: Vec<(&str, Starter)> = vec![(
        "outrigger (defaults)",
        Box::new(|| {
            let (addr, admin) = (free_port(), free_port());
            let config = outrigger_config(addr, admin, &addrs);
            spawn_outrigger(&proxy_bin, &config, addr, &dir.join("outrigger.yaml"))
        }),
    )];
    if let Some(envoy) = &envoy {
        targets.push((
            "envoy (Istio-like)",
            Box::new(|| {
                let (addr, admin) = (free_port(), free_port());
                let config = envoy_config(addr, admin, &addrs);
                spawn_envoy(envoy, &config, addr, &dir.join("envoy.yaml"))
            }),
        ));
    }
    let load = fixed_rate("chaos", rate, duration);
    // The fault starts a quarter in; a window fault lasts 10 s (kill-one: 7 s).
    let fault_at = Duration::from_secs(duration / 4);
    let mut rows = Vec::new();
    println!(
        "{:<10} {:<21} {:>8} {:>7} {:>9} {:>12} {:>8} {:>8} {:>10} {:>8}",
        "scenario",
        "target",
        "requests",
        "failed",
        "att/req",
        "att/req win",
        "p50 ms",
        "p99 ms",
        "back (s)",
        "µs/req"
    );
    for scenario in SCENARIOS {
        for (name, start) in &targets {
            for e in &endpoints {
                e.reset();
            }
            let target = start();
            std::thread::sleep(Duration::from_millis(500));
            let before: u64 = endpoints
                .iter()
                .map(|e| e.requests.load(Ordering::Relaxed))
                .sum();
            let window = std::thread::scope(|s| {
                let fault = s.spawn(|| {
                    let count = || -> u64 {
                        endpoints
                            .iter()
                            .map(|e| e.requests.load(Ordering::Relaxed))
                            .sum()
                    };
                    std::thread::sleep(fault_at);
                    match scenario {
                        "kill-one" => {
                            endpoints[0].kill();
                            std::thread::sleep(Duration::from_secs(7));
                            endpoints[0].restart();
                            None
                        }
                        "flaky-one" => {
                            endpoints[0].mode.store(FLAKY, Ordering::Relaxed);
                            None
                        }
                        "all-fail" => {
                            let at_start = count();
                            for e in &endpoints {
                                e.mode.store(FAIL_ALL, Ordering::Relaxed);
                            }
                            std::thread::sleep(Duration::from_secs(10));
                            let in_window = count() - at_start;
                            for e in &endpoints {
                                e.mode.store(NORMAL, Ordering::Relaxed);
                            }
                            Some(in_window)
                        }
                        _ => {
                            endpoints[0].mode.store(SLOW, Ordering::Relaxed);
                            None
                        }
                    }
                });
                let m = run_h2load(&load, &target, &dir.join("h2load.log"));
                (m, fault.join().unwrap())
            });
            let (m, in_window) = window;
            let attempts: u64 = endpoints
                .iter()
                .map(|e| e.requests.load(Ordering::Relaxed))
                .sum::<u64>()
                - before;
            let per_request = attempts as f64 / m.requests.max(1) as f64;
            // The load is a fixed rate: the window's client requests are its length × the rate.
            let window_ratio = in_window.map(|n| n as f64 / (rate as f64 * 10.0));
            let back = match (
                *endpoints[0].back_at.lock().unwrap(),
                *endpoints[0].first_after_back.lock().unwrap(),
            ) {
                (Some(b), Some(f)) if scenario == "kill-one" => {
                    Some(f.saturating_duration_since(b).as_secs_f64())
                }
                _ => None,
            };
            let show = |v: Option<f64>, digits: usize| {
                v.map_or("-".to_string(), |v| format!("{v:.digits$}"))
            };
            println!(
                "{:<10} {:<21} {:>8} {:>7} {:>9.3} {:>12} {:>8.3} {:>8.3} {:>10} {:>8}",
                scenario,
                name,
                m.requests,
                m.failed,
                per_request,
                show(window_ratio, 3),
                m.p50_ms,
                m.p99_ms,
                show(back, 2),
                show(m.cpu_us_per_req, 1),
            );
            rows.push(json!({
                "scenario": scenario,
                "target": name,
                "requests": m.requests,
                "failed": m.failed,
                "attempts_per_request": per_request,
                "attempts_per_request_in_fault_window": window_ratio,
                "p50_ms": m.p50_ms,
                "p99_ms": m.p99_ms,
                "restarted_endpoint_first_request_s": back,
                "cpu_us_per_request": m.cpu_us_per_req,
            }));
            drop(target);
        }
    }
    let doc = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "duration_s": duration,
        "fixed_rate_rps": rate,
        "fault_at_s": fault_at.as_secs(),
        "rows": rows,
    });
    write_json(&out_dir, "chaos.json", &doc);
    let _ = std::fs::remove_dir_all(&dir);
}
