//! `outrigger-proxy demo`: the proxy in front of two demo upstreams, with traffic, and a
//! live summary once a second. Everything runs on loopback in this one process.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::app;

const CONFIG: &str = include_str!("demo.yaml");

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub async fn run(duration: Duration) -> Result<(), BoxError> {
    let v1 = demo_upstream("shop-v1").await?;
    let v2 = demo_upstream("shop-v2").await?;
    let dir = std::env::temp_dir().join(format!("outrigger-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("demo.yaml");
    std::fs::write(
        &path,
        CONFIG
            .replace("{V1}", &v1.to_string())
            .replace("{V2}", &v2.to_string()),
    )?;

    let proxy = app::start(app::Options::new(&path)).await?;
    let outbound = proxy.listener_addr("outbound");
    let admin = proxy
        .admin_addr
        .ok_or("demo config has an admin listener")?;
    println!("outrigger demo");
    println!("  upstreams   shop-v1 (HTTP/1.1) {v1}   shop-v2 (HTTP/2) {v2}");
    println!("  proxy       outbound {outbound}   admin http://{admin}/metrics  /config");
    println!(
        "  config      {} (edit it while the demo runs: it reloads)",
        path.display()
    );
    println!(
        "  traffic     4 clients → Host: shop.demo   (90/10 split, /slow times out at 100 ms, unknown host → 404)"
    );
    println!();

    drive(outbound, admin, "shop.demo", duration, |_| {}).await?;
    proxy.drain(Duration::from_secs(2)).await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

struct Sample {
    status: u16,
    upstream: Option<String>,
    latency: Duration,
}

#[derive(Default)]
struct Window {
    statuses: BTreeMap<u16, u64>,
    upstreams: BTreeMap<String, u64>,
    latencies: Vec<Duration>,
}

impl Window {
    fn add(&mut self, s: &Sample) {
        *self.statuses.entry(s.status).or_default() += 1;
        if let Some(u) = &s.upstream {
            *self.upstreams.entry(u.clone()).or_default() += 1;
        }
        self.latencies.push(s.latency);
    }

    fn line(&mut self, over: Duration) -> String {
        let n = self.latencies.len();
        self.latencies.sort();
        let pct = |p: f64| {
            self.latencies
                .get(((n as f64 * p) as usize).min(n.saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(s, c)| format!("{s}:{c}"))
            .collect();
        let answered: u64 = self.upstreams.values().sum();
        let split: Vec<String> = self
            .upstreams
            .iter()
            .map(|(u, c)| format!("{u} {:.1}%", 100.0 * *c as f64 / answered.max(1) as f64))
            .collect();
        format!(
            "{:>6.0} req/s  p50 {:>5.2} ms  p99 {:>6.2} ms  status [{}]  split [{}]",
            n as f64 / over.as_secs_f64(),
            pct(0.50).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            statuses.join(" "),
            split.join(", ")
        )
    }
}

/// Sends traffic from four clients to `host` through the proxy at `outbound` for `duration`,
/// printing a summary line a second, then the totals and the proxy's request counters.
/// `at_second` runs after each line with the seconds elapsed, so a demo can change
/// something mid-run and show its effect.
pub async fn drive(
    outbound: SocketAddr,
    admin: SocketAddr,
    host: &'static str,
    duration: Duration,
    mut at_second: impl FnMut(u64),
) -> Result<(), BoxError> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Sample>();
    let stop = Arc::new(AtomicBool::new(false));
    for worker in 0..4 {
        tokio::spawn(client_loop(
            worker,
            outbound,
            host,
            tx.clone(),
            stop.clone(),
        ));
    }
    drop(tx);

    let started = Instant::now();
    let mut total = Window::default();
    let mut window = Window::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            Some(s) = rx.recv() => {
                window.add(&s);
                total.add(&s);
            }
            _ = tick.tick() => {
                let secs = started.elapsed().as_secs();
                println!("t={secs:>2}s  {}", window.line(Duration::from_secs(1)));
                window = Window::default();
                if started.elapsed() >= duration {
                    break;
                }
                at_second(secs);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    println!();
    println!("total   {}", total.line(started.elapsed()));
    let metrics = Client::builder(TokioExecutor::new())
        .build_http::<Empty<Bytes>>()
        .get(format!("http://{admin}/metrics").parse()?)
        .await?
        .into_body()
        .collect()
        .await?
        .to_bytes();
    println!("\nfrom the proxy's admin endpoint (/metrics):");
    for line in String::from_utf8_lossy(&metrics)
        .lines()
        .filter(|l| l.starts_with("outrigger_requests_total"))
    {
        println!("  {line}");
    }
    Ok(())
}

async fn client_loop(
    worker: usize,
    proxy: SocketAddr,
    known_host: &'static str,
    tx: mpsc::UnboundedSender<Sample>,
    stop: Arc<AtomicBool>,
) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        // Mostly ordinary requests; now and then a slow one and one for an unknown host.
        let (host, path) = match (i + worker as u64) % 200 {
            0 => (known_host, "/slow"),
            1 => ("unknown.demo", "/"),
            _ => (known_host, "/"),
        };
        let req = Request::builder()
            .uri(format!("http://{proxy}{path}"))
            .header("host", host)
            .body(Empty::new())
            .expect("static request");
        let started = Instant::now();
        let sample = match client.request(req).await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let upstream = resp
                    .headers()
                    .get("x-upstream")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let _ = resp.into_body().collect().await;
                Sample {
                    status,
                    upstream,
                    latency: started.elapsed(),
                }
            }
            Err(_) => Sample {
                status: 0,
                upstream: None,
                latency: started.elapsed(),
            },
        };
        if tx.send(sample).is_err() {
            return;
        }
    }
}

/// A tiny upstream speaking HTTP/1.1 and HTTP/2; `/slow` takes 300 ms.
pub async fn demo_upstream(name: &'static str) -> Result<SocketAddr, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| async move {
                    if req.uri().path().starts_with("/slow") {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    let mut resp =
                        Response::new(Full::new(Bytes::from(format!("hello from {name}\n"))));
                    resp.headers_mut()
                        .insert("x-upstream", http::HeaderValue::from_static(name));
                    Ok::<_, Infallible>(resp)
                });
                let mut buf = [0u8; 1];
                // Serve both protocols, as the demo config uses one of each.
                if stream.peek(&mut buf).await.is_ok() && buf[0] == b'P' {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                }
            });
        }
    });
    Ok(addr)
}
