//! The "hostile" scenario: a client that opens far more connections than a port allows and
//! then misbehaves on each, aimed at the proxy's admin port and at every control-plane port.
//!
//! Three kinds of connection, each in its own round against each port:
//! - **silent**: connects and sends nothing;
//! - **slow headers**: sends a request line, then one header line a second, never ending;
//! - **half preface** (gRPC ports) or **half hello** (TLS ports): the first bytes of the
//!   handshake, then nothing.
//!
//! For each port and kind it prints how many connections the port held at once (its cap),
//! how many it closed at once, how long the last one lasted, and the process's RSS before,
//! at its peak and after. No connection may outlive the port's deadlines, and RSS stays
//! bounded by the cap.
//!
//! `outrigger-bench hostile [--connections N]` (default: each port's cap plus 500)

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::{free_port, memory_kib, wait_for_port, write_json};

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Silent,
    SlowHeaders,
    HalfPreface,
    HalfHello,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Silent => "silent",
            Kind::SlowHeaders => "slow headers",
            Kind::HalfPreface => "half h2 preface",
            Kind::HalfHello => "half TLS hello",
        }
    }
}

struct Port {
    process: &'static str,
    name: &'static str,
    addr: SocketAddr,
    pid: u32,
    cap: usize,
    kinds: &'static [Kind],
}

/// Opens `n` connections, keeps misbehaving on them, and watches them close.
async fn attack(port: &Port, kind: Kind, n: usize, deadline: Duration) -> serde_json::Value {
    let rss_before = memory_kib(port.pid, "VmRSS:");
    let started = Instant::now();
    // Connections are opened by one task and watched by this loop at the same time, so a
    // lifetime is measured from its own connect, even while the rest are still opening.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = port.addr;
    // Several openers at once, as a real flood would be: the cap is reached within the
    // ports' deadlines.
    const OPENERS: usize = 32;
    let mut openers = Vec::new();
    for i in 0..OPENERS {
        let tx = tx.clone();
        let count = n / OPENERS + usize::from(i < n % OPENERS);
        openers.push(tokio::spawn(async move {
            for _ in 0..count {
                if let Ok(mut s) = TcpStream::connect(addr).await {
                    let first: &[u8] = match kind {
                        Kind::Silent => b"",
                        Kind::SlowHeaders => b"GET /metrics HTTP/1.1\r\nHost: x\r\n",
                        Kind::HalfPreface => b"PRI * HTTP/2.0\r\n",
                        // A TLS record header announcing a ClientHello that never comes.
                        Kind::HalfHello => &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01],
                    };
                    let _ = s.write_all(first).await;
                    let _ = tx.send((s, Instant::now()));
                }
            }
        }));
    }
    drop(tx);
    let mut conns = Vec::with_capacity(n);
    let mut opened = 0;
    let mut rss_peak = memory_kib(port.pid, "VmRSS:");
    let mut held_peak = 0;
    let mut closed_at_once = None;
    // The longest any connection lived, from its own connect to its close.
    let mut longest = Duration::ZERO;
    let mut all_open = None;
    let mut tick = 0u64;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        tick += 1;
        while let Ok(c) = rx.try_recv() {
            conns.push(Some(c));
            opened += 1;
        }
        if openers.iter().all(|o| o.is_finished()) && rx.is_empty() {
            all_open.get_or_insert_with(Instant::now);
        }
        let mut held = 0;
        for slot in conns.iter_mut() {
            let Some((s, opened_at)) = slot else { continue };
            let lived = opened_at.elapsed();
            let mut buf = [0u8; 256];
            let closed = loop {
                match s.try_read(&mut buf) {
                    Ok(0) => break true,
                    // A 408 or a SETTINGS frame: read on until the close.
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
                    Err(_) => break true,
                }
            };
            if closed {
                *slot = None;
                longest = longest.max(lived);
            } else {
                held += 1;
                if kind == Kind::SlowHeaders && tick.is_multiple_of(4) {
                    let _ = s.try_write(b"X-Slow: 1\r\n");
                }
            }
        }
        held_peak = held_peak.max(held);
        if all_open.is_some() {
            closed_at_once.get_or_insert(opened - held);
        }
        rss_peak = rss_peak.max(memory_kib(port.pid, "VmRSS:"));
        let Some(all_open) = all_open else { continue };
        if held == 0 || all_open.elapsed() > deadline {
            let left = held;
            let rss_after = memory_kib(port.pid, "VmRSS:");
            return json!({
                "process": port.process,
                "port": port.name,
                "kind": kind.name(),
                "cap": port.cap,
                "opened": opened,
                "held_at_peak": held_peak,
                "closed_by_the_time_all_were_open": closed_at_once.unwrap_or(0),
                "still_open_at_deadline": left,
                "longest_lived_s": longest.as_secs_f64(),
                "opening_took_s": (all_open - started).as_secs_f64(),
                "rss_before_kib": rss_before,
                "rss_peak_kib": rss_peak,
                "rss_after_kib": rss_after,
            });
        }
    }
}

pub fn run(args: &[String]) {
    let mut extra: Option<usize> = None;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--connections" => extra = it.next().and_then(|v| v.parse().ok()),
            other => panic!("unknown flag {other}; flags: --connections N"),
        }
    }
    let dir = std::env::temp_dir().join(format!("outrigger-bench-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mesh = dir.join("mesh.yaml");
    std::fs::write(
        &mesh,
        "services:\n  - name: a\n    endpoints: [{address: \"127.0.0.1:9\"}]\n",
    )
    .unwrap();
    let (xds, secure, cp_admin, webhook) = (free_port(), free_port(), free_port(), free_port());
    let cp = Process(
        Command::new(PathBuf::from("target/release/outrigger-control-plane"))
            .args(["serve", "--workers", "1", "--mesh"])
            .arg(&mesh)
            .args([
                "--xds",
                &xds.to_string(),
                "--secure-xds",
                &secure.to_string(),
            ])
            .args([
                "--admin",
                &cp_admin.to_string(),
                "--webhook",
                &webhook.to_string(),
            ])
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .spawn()
            .expect("target/release/outrigger-control-plane (scripts/bench builds it)"),
    );
    let (proxy_admin, listener) = (free_port(), free_port());
    let config = dir.join("proxy.yaml");
    std::fs::write(
        &config,
        format!("admin: {{address: \"{proxy_admin}\"}}\nlisteners:\n  - name: l\n    address: \"{listener}\"\n    direction: inbound\n    virtual_hosts: []\n"),
    )
    .unwrap();
    let proxy = Process(
        Command::new(crate::default_proxy())
            .args(["run", "--workers", "1", "--config"])
            .arg(&config)
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .spawn()
            .expect("the release proxy (scripts/bench builds it)"),
    );
    for addr in [xds, secure, cp_admin, webhook, proxy_admin] {
        wait_for_port(addr);
    }
    let (admin_cap, grpc_cap) = (
        outrigger_core::bounded_server::Limits::ADMIN.max_connections,
        outrigger_control_plane::grpc_limits::MAX_CONNECTIONS,
    );
    const HTTP: &[Kind] = &[Kind::Silent, Kind::SlowHeaders];
    const GRPC: &[Kind] = &[Kind::Silent, Kind::HalfPreface];
    const TLS: &[Kind] = &[Kind::Silent, Kind::HalfHello];
    let ports = [
        Port {
            process: "proxy",
            name: "admin",
            addr: proxy_admin,
            pid: proxy.0.id(),
            cap: admin_cap,
            kinds: HTTP,
        },
        Port {
            process: "control plane",
            name: "admin",
            addr: cp_admin,
            pid: cp.0.id(),
            cap: admin_cap,
            kinds: HTTP,
        },
        Port {
            process: "control plane",
            name: "webhook",
            addr: webhook,
            pid: cp.0.id(),
            cap: admin_cap,
            kinds: TLS,
        },
        Port {
            process: "control plane",
            name: "xDS (plaintext)",
            addr: xds,
            pid: cp.0.id(),
            cap: grpc_cap,
            kinds: GRPC,
        },
        Port {
            process: "control plane",
            name: "xDS + CA (TLS)",
            addr: secure,
            pid: cp.0.id(),
            cap: grpc_cap,
            kinds: TLS,
        },
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    println!(
        "| process | port | connections | cap | held at peak | closed by the time all were open | longest lived (s) | still open | RSS before → peak → after (MB) |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---|");
    for port in &ports {
        for &kind in port.kinds {
            let n = port.cap + extra.unwrap_or(500);
            let row = rt.block_on(attack(port, kind, n, Duration::from_secs(30)));
            let mb = |k: &str| row[k].as_u64().unwrap_or(0) as f64 / 1024.0;
            println!(
                "| {} | {} | {} × {} | {} | {} | {} | {:.1} | {} | {:.1} → {:.1} → {:.1} |",
                port.process,
                port.name,
                row["opened"],
                kind.name(),
                port.cap,
                row["held_at_peak"],
                row["closed_by_the_time_all_were_open"],
                row["longest_lived_s"].as_f64().unwrap_or(0.0),
                row["still_open_at_deadline"],
                mb("rss_before_kib"),
                mb("rss_peak_kib"),
                mb("rss_after_kib"),
            );
            rows.push(row);
        }
    }
    write_json(
        std::path::Path::new("target/bench"),
        "hostile.json",
        &json!({"rows": rows}),
    );
}
