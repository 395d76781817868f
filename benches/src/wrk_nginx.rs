//! A closed-loop row beside h2load's: `wrk -t1 -c32` through each proxy to an nginx upstream,
//! the setup behind the figures the performance work quotes, so that they are reproduced from
//! the same run as the rest of the table.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{
    Measured, RunArgs, Target, cpu_seconds, free_port, machine_ticks, memory_kib, start_envoy,
    start_haproxy, start_outrigger, steal_since, wait_for_port,
};

pub(crate) const SCENARIO: &str = "http1 wrk nginx";

/// nginx with one worker answering every request with 128 bytes.
pub(crate) struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn start_nginx(dir: &Path) -> Option<(SocketAddr, Nginx)> {
    let addr = free_port();
    let d = dir.display();
    let body = "x".repeat(128);
    let config = format!(
        "worker_processes 1;\ndaemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/nginx-body;\n  proxy_temp_path {d}/nginx-proxy;\n  fastcgi_temp_path {d}/nginx-fastcgi;\n  uwsgi_temp_path {d}/nginx-uwsgi;\n  scgi_temp_path {d}/nginx-scgi;\n  keepalive_requests 10000000;\n  server {{\n    listen {addr};\n    location / {{ return 200 \"{body}\"; }}\n  }}\n}}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, config).unwrap();
    let child = Command::new("nginx")
        .args(["-p"])
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    wait_for_port(addr);
    Some((addr, Nginx(child)))
}

/// What `wrk --latency` printed: requests, non-2xx answers, and the 50th and 99th
/// percentiles of latency.
fn parse(text: &str) -> (u64, u64, f64, f64) {
    let ms = |v: &str| -> f64 {
        let (n, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
        let n: f64 = n.parse().unwrap_or(0.0);
        match unit {
            "us" => n / 1e3,
            "ms" => n,
            "s" => n * 1e3,
            _ => n,
        }
    };
    let mut out = (0, 0, 0.0, 0.0);
    for line in text.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("50%"), Some(v)) => out.2 = ms(v),
            (Some("99%"), Some(v)) => out.3 = ms(v),
            (Some(n), Some("requests")) => out.0 = n.parse().unwrap_or(0),
            _ => {}
        }
        if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
            out.1 = n.trim().parse().unwrap_or(0);
        }
    }
    out
}

fn run_wrk(target: &Target, duration: u64) -> Measured {
    let pid = target.child.as_ref().map(|c| c.id());
    let url = format!("http://{}/", target.addr);
    // Warm up pools and caches first, as the h2load rows do.
    let _ = Command::new("wrk")
        .args(["-t1", "-c32", "-d1s", &url])
        .output();
    let before = pid.map(cpu_seconds);
    let ticks_before = machine_ticks();
    let out = Command::new("wrk")
        .args(["-t1", "-c32", &format!("-d{duration}s"), "--latency", &url])
        .output()
        .expect("wrk is installed (apt-get install wrk)");
    let cpu = pid.map(|p| cpu_seconds(p) - before.unwrap());
    let steal_pct = steal_since(ticks_before);
    let (requests, failed, p50_ms, p99_ms) = parse(&String::from_utf8_lossy(&out.stdout));
    Measured {
        requests,
        failed,
        rps: requests as f64 / duration as f64,
        p50_ms,
        p99_ms,
        cpu_us_per_req: cpu.map(|c| c * 1e6 / requests.max(1) as f64),
        steal_pct,
    }
}

/// One row per target: (target, measured, idle KiB, peak KiB). Empty when wrk or nginx is
/// missing.
pub(crate) fn rows(
    args: &RunArgs,
    dir: &Path,
) -> Vec<(&'static str, Measured, Option<u64>, Option<u64>)> {
    let have = |bin: &str| Command::new(bin).arg("-v").output().is_ok();
    if !have("wrk") || !have("nginx") {
        eprintln!("wrk or nginx is missing: the wrk row is left out (scripts/bench installs them)");
        return Vec::new();
    }
    let Some((upstream, _nginx)) = start_nginx(dir) else {
        eprintln!("nginx did not start: the wrk row is left out");
        return Vec::new();
    };
    let mut starts: Vec<Box<dyn Fn() -> Target + '_>> = vec![
        Box::new(move || Target {
            name: "direct",
            addr: upstream,
            child: None,
        }),
        Box::new(|| start_outrigger(&args.proxy_bin, upstream, dir)),
    ];
    if let Some(baseline) = &args.baseline_bin {
        starts.push(Box::new(|| {
            let mut target = start_outrigger(baseline, upstream, dir);
            target.name = "outrigger (baseline)";
            target
        }));
    }
    if let Some(envoy) = &args.envoy_bin {
        starts.push(Box::new(|| start_envoy(envoy, upstream, dir)));
    }
    if let Some(haproxy) = &args.haproxy_bin {
        starts.push(Box::new(|| start_haproxy(haproxy, upstream, dir)));
    }
    let mut rows = Vec::new();
    for start in &starts {
        let target = start();
        let pid = target.child.as_ref().map(|c| c.id());
        std::thread::sleep(Duration::from_millis(500));
        let idle = pid.map(|p| memory_kib(p, "VmRSS:"));
        eprintln!("running {SCENARIO:<16} through {}", target.name);
        let m = run_wrk(&target, args.duration);
        let peak = pid.map(|p| memory_kib(p, "VmHWM:"));
        rows.push((target.name, m, idle, peak));
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_read() {
        let text = "Running 10s test @ http://127.0.0.1:1/\n  1 threads and 32 connections\n  Latency Distribution\n     50%  812.00us\n     75%    1.01ms\n     90%    1.20ms\n     99%    2.50ms\n  376012 requests in 10.00s, 91.80MB read\n  Non-2xx or 3xx responses: 3\nRequests/sec:  37601.20\n";
        let (n, failed, p50, p99) = parse(text);
        assert_eq!((n, failed), (376012, 3));
        assert!((p50 - 0.812).abs() < 1e-9 && (p99 - 2.5).abs() < 1e-9);
    }
}
