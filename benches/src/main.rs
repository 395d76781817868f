//! The comparison harness: the same load through no proxy, through Outrigger, and through
//! Envoy, in one run, on one machine.
//!
//! Run it with `scripts/bench` (which builds the release proxy and installs Envoy into a
//! local venv). It prints one table and writes the same rows as JSON under `target/bench/`.
//! `outrigger-bench xds-scale` measures the control plane instead (see `xds_scale.rs`), and
//! `outrigger-bench resilience` a failing endpoint behind retries (see `resilience.rs`).
//!
//! Latency percentiles come from h2load's per-request log, CPU from the proxy process's own
//! user+system time in /proc, and memory from its VmRSS (idle, after start) and VmHWM (peak).

use std::convert::Infallible;
use std::io::Write;
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;

/// One load shape, driven by h2load against whichever address is under test.
pub(crate) struct Scenario {
    name: &'static str,
    h2load: Vec<String>,
    fixed_rate: bool,
}

fn scenarios(args: &RunArgs) -> Vec<Scenario> {
    let d = format!("{}", args.duration);
    let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        fixed_rate("http1 fixed rate", args.rate, args.duration),
        Scenario {
            name: "http1 max",
            h2load: v(&["--h1", "-c", "50", "-t", "1", "-D", &d]),
            fixed_rate: false,
        },
        Scenario {
            name: "http2 max",
            h2load: v(&["-c", "10", "-m", "10", "-t", "1", "-D", &d]),
            fixed_rate: false,
        },
    ]
}

pub(crate) struct Target {
    pub(crate) name: &'static str,
    pub(crate) addr: SocketAddr,
    pub(crate) child: Option<Child>,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) fn free_port() -> SocketAddr {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

pub(crate) fn wait_for_port(addr: SocketAddr) {
    let until = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < until, "{addr} did not start listening");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The upstream every path ends at: a 1-thread hyper server answering a fixed 128-byte body.
pub(crate) fn start_upstream() -> SocketAddr {
    start_upstream_failing(0)
}

/// An upstream that answers every `fail_every`-th request with 503 (0: never), so that a
/// failure share is exact rather than sampled.
pub(crate) fn start_upstream_failing(fail_every: u64) -> SocketAddr {
    let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let body = Bytes::from(vec![b'x'; 128]);
    serve_in_thread(move |stream| {
        let _ = stream.set_nodelay(true);
        let (body, counter) = (body.clone(), counter.clone());
        async move {
            let svc = service_fn(move |_req| {
                let body = body.clone();
                let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                async move {
                    let mut resp = hyper::Response::new(Full::new(body));
                    if fail_every > 0 && n % fail_every == 0 {
                        *resp.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        }
    })
}

/// A loopback server on a one-thread runtime of its own thread: `serve` gets each accepted
/// connection. Kept off the proxy's runtime so that the load generator's far end costs the
/// proxy nothing.
pub(crate) fn serve_in_thread<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let std_listener = StdListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let addr = std_listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            loop {
                if let Ok((stream, _)) = listener.accept().await {
                    tokio::spawn(serve(stream));
                }
            }
        });
    });
    addr
}

pub(crate) fn start_outrigger(bin: &Path, upstream: SocketAddr, dir: &Path) -> Target {
    let (addr, admin) = (free_port(), free_port());
    let config = format!(
        "admin:\n  address: {admin}\nworkers: 1\nlisteners:\n  - name: bench\n    address: {addr}\n    direction: outbound\n    virtual_hosts:\n      - name: all\n        domains: [\"*\"]\n        routes:\n          - backends: [{{cluster: upstream}}]\nclusters:\n  - name: upstream\n    endpoints: [{{address: \"{upstream}\"}}]\n"
    );
    spawn_outrigger(bin, &config, addr, &dir.join("outrigger.yaml"))
}

/// Runs our proxy, single worker, on a config (written to `path`) that listens on `addr`.
pub(crate) fn spawn_outrigger(bin: &Path, config: &str, addr: SocketAddr, path: &Path) -> Target {
    std::fs::write(path, config).unwrap();
    let child = Command::new(bin)
        .args(["run", "--workers", "1", "--config"])
        .arg(path)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e} (build it: cargo build --release)",
                bin.display()
            )
        });
    wait_for_port(addr);
    Target {
        name: "outrigger",
        addr,
        child: Some(child),
    }
}

pub(crate) fn start_envoy(envoy: &Path, upstream: SocketAddr, dir: &Path) -> Target {
    let (addr, admin) = (free_port(), free_port());
    let config = format!(
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
                          route: {{cluster: upstream}}
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: upstream
      type: STATIC
      connect_timeout: 1s
      load_assignment:
        cluster_name: upstream
        endpoints:
          - lb_endpoints:
              - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {up_port}}}}}}}
"#,
        admin_port = admin.port(),
        port = addr.port(),
        up_port = upstream.port()
    );
    spawn_envoy(envoy, &config, addr, &dir.join("envoy.yaml"))
}

/// HAProxy with one thread, in HTTP mode with keep-alive to the upstream: the same work as the
/// two proxies' single routes. Its config is written to `dir`.
pub(crate) fn start_haproxy(haproxy: &Path, upstream: SocketAddr, dir: &Path) -> Target {
    let addr = free_port();
    let config = format!(
        "global\n  nbthread 1\n  maxconn 9900\n  ulimit-n 20000\n\ndefaults\n  mode http\n  option http-keep-alive\n  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\n\nfrontend bench\n  bind {addr}\n  default_backend upstream\n\nbackend upstream\n  http-reuse always\n  server up {upstream}\n"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config).unwrap();
    let child = Command::new(haproxy)
        // Foreground, one process: its CPU is the process's own.
        .args(["-db", "-f"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start haproxy at {}: {e}", haproxy.display()));
    wait_for_port(addr);
    Target {
        name: "haproxy 2.6",
        addr,
        child: Some(child),
    }
}

/// Runs Envoy, single worker, on a config (written to `path`) that listens on `addr`.
pub(crate) fn spawn_envoy(envoy: &Path, config: &str, addr: SocketAddr, path: &Path) -> Target {
    std::fs::write(path, config).unwrap();
    let child = Command::new(envoy)
        .args([
            "--concurrency",
            "1",
            "--log-level",
            "warn",
            "--disable-hot-restart",
            "-c",
        ])
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start envoy at {}: {e}", envoy.display()));
    wait_for_port(addr);
    Target {
        name: "envoy",
        addr,
        child: Some(child),
    }
}

/// utime + stime of a process, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may contain spaces; fields are counted after its closing parenthesis.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / clock_ticks_per_second()
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// A field of /proc/PID/status in KiB (VmRSS now, VmHWM at its peak).
pub(crate) fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

pub(crate) struct Measured {
    requests: u64,
    failed: u64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us_per_req: Option<f64>,
    /// The share of the machine's CPU time its hypervisor took back while the row ran.
    steal_pct: f64,
}

/// The machine's stolen and total CPU ticks so far (the `cpu` line of /proc/stat). A share
/// of steal over a row says the row ran while the VM's neighbours were busy, which moves
/// every figure in it: a row to read with care, or to run again.
pub(crate) fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .find_map(|l| l.strip_prefix("cpu "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|t| t.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // user nice system idle iowait irq softirq steal; guest time is inside user already.
    let total = ticks.iter().take(8).sum();
    (ticks.get(7).copied().unwrap_or(0), total)
}

/// Steal since `before` (from `machine_ticks`), in percent.
pub(crate) fn steal_since(before: (u64, u64)) -> f64 {
    let now = machine_ticks();
    let total = now.1.saturating_sub(before.1).max(1);
    now.0.saturating_sub(before.0) as f64 * 100.0 / total as f64
}

impl Measured {
    /// A JSON row: `head`'s keys, then the measured fields.
    pub(crate) fn row(&self, mut head: serde_json::Value) -> serde_json::Value {
        let measured = json!({
            "requests": self.requests,
            "failed": self.failed,
            "rps": self.rps,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "cpu_us_per_request": self.cpu_us_per_req,
            "steal_pct": self.steal_pct,
        });
        if let (Some(head), serde_json::Value::Object(measured)) = (head.as_object_mut(), measured)
        {
            head.extend(measured);
        }
        head
    }
}

pub(crate) fn run_h2load(scenario: &Scenario, target: &Target, log: &Path) -> Measured {
    let pid = target.child.as_ref().map(|c| c.id());
    // h2load appends to its log; each run must start from an empty one.
    let _ = std::fs::remove_file(log);
    let cpu_before = pid.map(cpu_seconds);
    let ticks_before = machine_ticks();
    let started = Instant::now();
    let out = Command::new("h2load")
        .args(&scenario.h2load)
        .arg("--log-file")
        .arg(log)
        .arg(format!("http://{}/", target.addr))
        .output()
        .expect("h2load is installed (apt-get install nghttp2-client)");
    let wall = started.elapsed().as_secs_f64();
    let cpu = pid.map(|p| cpu_seconds(p) - cpu_before.unwrap());
    let steal_pct = steal_since(ticks_before);
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lat: Vec<u64> = Vec::new();
    let mut failed = 0;
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() >= 3 {
            if cols[1] != "200" {
                failed += 1;
            }
            if let Ok(us) = cols[2].parse() {
                lat.push(us);
            }
        }
    }
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    let rps = text
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|s| s.trim_end_matches(" req/s").parse().ok())
        .unwrap_or(lat.len() as f64 / wall);
    let requests = lat.len() as u64;
    Measured {
        requests,
        failed,
        rps,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        cpu_us_per_req: cpu.map(|c| c * 1e6 / requests.max(1) as f64),
        steal_pct,
    }
}

/// The flags every side-by-side scenario takes: `--duration SECONDS`, `--rate RPS` (the
/// fixed rate), `--proxy PATH` (our release binary).
/// The flags every side-by-side scenario takes.
pub(crate) struct RunArgs {
    pub duration: u64,
    pub rate: u64,
    pub proxy_bin: PathBuf,
    /// `None`: Envoy is left out of the comparison.
    pub envoy_bin: Option<PathBuf>,
    pub out_dir: PathBuf,
    /// Another build of the proxy (the previous main, say), measured in the same run as
    /// `outrigger (baseline)`.
    pub baseline_bin: Option<PathBuf>,
    /// Run only the scenarios whose name contains this.
    pub only: Option<String>,
    /// `None`: HAProxy is left out of the comparison.
    pub haproxy_bin: Option<PathBuf>,
    /// How many times the side-by-side scenarios run through every target (`rounds`).
    pub rounds: usize,
}

/// The proxy measured unless `--proxy` says otherwise: `PROXY_BIN` (scripts/bench sets it to
/// the profile-guided build, see scripts/pgo), else the plain release build.
pub(crate) fn default_proxy() -> PathBuf {
    std::env::var_os("PROXY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/release/outrigger-proxy"))
}

pub(crate) fn run_args(raw: &[String]) -> RunArgs {
    let mut args = RunArgs {
        duration: 10,
        rate: 1000,
        proxy_bin: default_proxy(),
        envoy_bin: std::env::var_os("ENVOY_BIN").map(PathBuf::from),
        out_dir: PathBuf::from("target/bench"),
        baseline_bin: None,
        only: None,
        haproxy_bin: std::env::var_os("HAPROXY_BIN")
            .map(PathBuf::from)
            .or_else(|| Some(PathBuf::from("/usr/sbin/haproxy")).filter(|p| p.exists())),
        rounds: 1,
    };
    let mut it = raw.iter();
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--duration" => args.duration = value.parse().expect("--duration SECONDS"),
            "--rate" => args.rate = value.parse().expect("--rate REQUESTS_PER_SECOND"),
            "--proxy" => args.proxy_bin = value.into(),
            "--envoy" => args.envoy_bin = Some(value.into()),
            "--out" => args.out_dir = value.into(),
            "--baseline" => args.baseline_bin = Some(value.into()),
            "--only" => args.only = Some(value.clone()),
            "--haproxy" => args.haproxy_bin = Some(value.into()),
            "--rounds" => args.rounds = value.parse().expect("--rounds N"),
            other => panic!(
                "unknown flag {other}; flags: --duration S --rate RPS --proxy PATH --envoy PATH --out DIR --baseline PATH --only NAME --haproxy PATH --rounds N"
            ),
        }
    }
    if args.envoy_bin.is_none() {
        eprintln!("ENVOY_BIN is not set: Envoy is left out (scripts/bench installs it)");
    }
    args
}

impl RunArgs {
    /// A fresh scratch directory for configs and certificates (and the output directory).
    pub(crate) fn scratch(&self, tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("outrigger-bench-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&self.out_dir).unwrap();
        dir
    }
}

/// HTTP/1.1 at a fixed rate over 10 connections: like for like, so CPU per request compares.
pub(crate) fn fixed_rate(name: &'static str, rate: u64, duration: u64) -> Scenario {
    let per_client = (rate / 10).max(1).to_string();
    let d = duration.to_string();
    Scenario {
        name,
        h2load: [
            "--h1",
            "-c",
            "10",
            "-t",
            "1",
            "--rps",
            &per_client,
            "-D",
            &d,
        ]
        .map(String::from)
        .to_vec(),
        fixed_rate: true,
    }
}

/// One row of the JSON output.
fn row_json(
    scenario: &str,
    target: &str,
    fixed_rate: bool,
    m: &Measured,
    (idle_kib, peak_kib): (Option<u64>, Option<u64>),
    (load_key, load): (&str, &str),
) -> serde_json::Value {
    let mut row = m.row(json!({
        "scenario": scenario,
        "target": target,
        "fixed_rate": fixed_rate,
    }));
    row["idle_rss_kib"] = json!(idle_kib);
    row["peak_rss_kib"] = json!(peak_kib);
    row[load_key] = json!(load);
    row
}

/// A control plane started for a scenario, killed when dropped.
pub(crate) struct Cp(pub(crate) std::process::Child);

impl Cp {
    /// `serve` on one worker thread with `mesh`, xDS and admin on the given addresses, and
    /// `extra` arguments; its log level is `warn`, its stdout dropped.
    pub(crate) fn serve(
        bin: &Path,
        mesh: &Path,
        (xds, admin): (SocketAddr, SocketAddr),
        extra: &[&std::ffi::OsStr],
    ) -> Cp {
        let child = Command::new(bin)
            .args(["serve", "--workers", "1", "--mesh"])
            .arg(mesh)
            .args(["--xds", &xds.to_string(), "--admin", &admin.to_string()])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e} (cargo build --release)",
                    bin.display()
                )
            });
        Cp(child)
    }
}

impl Drop for Cp {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The value at `p` (0 to 1) of sorted durations.
pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

/// Writes a scenario's rows, and says where.
pub(crate) fn write_json(out_dir: &Path, name: &str, doc: &serde_json::Value) {
    std::fs::create_dir_all(out_dir).unwrap();
    let path = out_dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "{}", serde_json::to_string_pretty(doc).unwrap()).unwrap();
    println!("wrote {}", path.display());
}

mod chaos;
mod churn;
mod hostile;
mod kube_idle;
mod memory;
mod mesh_hop;
mod resilience;
mod rounds;
mod tracing_cost;
mod wrk_nginx;
mod xds_scale;

/// What `--help` prints: each subcommand's flags are also named when one is unknown.
const USAGE: &str = "\
usage: outrigger-bench [FLAGS]          the comparison: no proxy, Outrigger, Envoy, HAProxy
         --duration S --rate RPS --rounds N --only NAME --out DIR
         --proxy PATH --baseline PATH --envoy PATH --haproxy PATH
       outrigger-bench SUBCOMMAND [FLAGS]
         memory      RSS per idle and keep-alive connection, per virtual host and route
         mesh-hop    two sidecars with mTLS against one Envoy doing plain HTTP
         xds-scale   the control plane: memory per ADS stream, full-push p99
         churn       the control plane: endpoint changes per second across scoped streams
         resilience  an endpoint failing one request in ten, behind retries and ejection
         tracing     a span per request, and a dead collector
         hostile     too many and misbehaving connections at the admin and control-plane ports
         chaos       a fault mid-run: ours on its defaults, Envoy set up as Istio's sidecar
         kube-idle   what the control plane asks of a Kubernetes API server
Environment: PROXY_BIN (the proxy measured), ENVOY_BIN, HAPROXY_BIN. scripts/bench runs it.";

fn main() {
    let raw: Vec<String> = std::env::args().skip(1).collect();
    if raw.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    match raw.first().map(String::as_str) {
        Some("xds-scale") => return xds_scale::run(&raw[1..], Path::new("target/bench")),
        Some("resilience") => return resilience::run(&raw[1..]),
        Some("mesh-hop") => return mesh_hop::run(&raw[1..]),
        Some("tracing") => return tracing_cost::run(&raw[1..]),
        Some("hostile") => return hostile::run(&raw[1..]),
        Some("chaos") => return chaos::run(&raw[1..]),
        Some("memory") => return memory::run(&raw[1..]),
        Some("kube-idle") => return kube_idle::run(&raw[1..]),
        Some("churn") => return churn::run(&raw[1..]),
        _ => {}
    }
    let args = run_args(&raw);
    let dir = args.scratch("direct");
    let upstream = start_upstream();
    wait_for_port(upstream);

    let mut rows = Vec::new();
    let mut table = Vec::new();
    let targets: Vec<Box<dyn Fn() -> Target>> = {
        let mut t: Vec<Box<dyn Fn() -> Target>> = vec![
            Box::new(move || Target {
                name: "direct",
                addr: upstream,
                child: None,
            }),
            Box::new(|| start_outrigger(&args.proxy_bin, upstream, &dir)),
        ];
        if let Some(baseline) = &args.baseline_bin {
            t.push(Box::new(|| {
                let mut target = start_outrigger(baseline, upstream, &dir);
                target.name = "outrigger (baseline)";
                target
            }));
        }
        if let Some(envoy) = &args.envoy_bin {
            t.push(Box::new(|| start_envoy(envoy, upstream, &dir)));
        }
        if let Some(haproxy) = &args.haproxy_bin {
            t.push(Box::new(|| start_haproxy(haproxy, upstream, &dir)));
        }
        t
    };
    // Every target is started, and measured idle, before the first row; then each round
    // runs each scenario through every target in turn (see `rounds`).
    let started: Vec<(Target, Option<u64>)> = targets
        .iter()
        .map(|start| {
            let target = start();
            let pid = target.child.as_ref().map(|c| c.id());
            // Let the process settle before calling its memory "idle".
            std::thread::sleep(Duration::from_millis(500));
            let idle_kib = pid.map(|p| memory_kib(p, "VmRSS:"));
            // Warm up connection pools and caches so the first scenario is not penalised.
            let _ = Command::new("h2load")
                .args(["--h1", "-c", "10", "-n", "2000"])
                .arg(format!("http://{}/", target.addr))
                .output();
            (target, idle_kib)
        })
        .collect();
    let chosen: Vec<Scenario> = scenarios(&args)
        .into_iter()
        .filter(|s| {
            args.only
                .as_deref()
                .is_none_or(|only| s.name.contains(only))
        })
        .collect();
    for round in 0..args.rounds {
        for scenario in &chosen {
            for i in rounds::order(started.len(), round) {
                let (target, idle_kib) = &started[i];
                let pid = target.child.as_ref().map(|c| c.id());
                eprintln!(
                    "round {}: running {:<16} through {}",
                    round + 1,
                    scenario.name,
                    target.name
                );
                let m = run_h2load(scenario, target, &dir.join("h2load.log"));
                let peak_kib = pid.map(|p| memory_kib(p, "VmHWM:"));
                let mut row = row_json(
                    scenario.name,
                    target.name,
                    scenario.fixed_rate,
                    &m,
                    (*idle_kib, peak_kib),
                    ("h2load_args", &scenario.h2load.join(" ")),
                );
                row["round"] = json!(round + 1);
                rows.push(row);
                table.push(rounds::Row {
                    round,
                    scenario: scenario.name,
                    target: target.name,
                    measured: m,
                    idle_kib: *idle_kib,
                    peak_kib,
                });
            }
        }
    }
    drop(started);

    if args
        .only
        .as_deref()
        .is_none_or(|only| wrk_nginx::SCENARIO.contains(only))
    {
        for (target, m, idle_kib, peak_kib) in wrk_nginx::rows(&args, &dir) {
            rows.push(row_json(
                wrk_nginx::SCENARIO,
                target,
                false,
                &m,
                (idle_kib, peak_kib),
                ("wrk_args", "-t1 -c32 (nginx upstream)"),
            ));
            table.push(rounds::Row {
                round: 0,
                scenario: wrk_nginx::SCENARIO,
                target,
                measured: m,
                idle_kib,
                peak_kib,
            });
        }
    }

    // The h2load scenarios in their order (each in round order), then the wrk row.
    table.sort_by_key(|r| {
        scenarios(&args)
            .iter()
            .position(|x| x.name == r.scenario)
            .unwrap_or(usize::MAX)
    });
    let mut out = String::new();
    out.push_str(&format!(
        "{:<17} {:<5} {:<10} {:>10} {:>9} {:>9} {:>11} {:>9} {:>9} {:>7} {:>8}\n",
        "scenario",
        "round",
        "target",
        "req/s",
        "p50 ms",
        "p99 ms",
        "cpu µs/req",
        "idle MB",
        "peak MB",
        "failed",
        "steal %"
    ));
    let mb = |k: Option<u64>| k.map_or("-".to_string(), |k| format!("{:.1}", k as f64 / 1024.0));
    for r in &table {
        let m = &r.measured;
        out.push_str(&format!(
            "{:<17} {:<5} {:<10} {:>10.0} {:>9.3} {:>9.3} {:>11} {:>9} {:>9} {:>7} {:>8.1}\n",
            r.scenario,
            r.round + 1,
            r.target,
            m.rps,
            m.p50_ms,
            m.p99_ms,
            m.cpu_us_per_req.map_or("-".into(), |c| format!("{c:.1}")),
            mb(r.idle_kib),
            mb(r.peak_kib),
            m.failed,
            m.steal_pct
        ));
    }
    let mut names: Vec<&'static str> = chosen.iter().map(|s| s.name).collect();
    names.push(wrk_nginx::SCENARIO);
    let (summary, summary_json) = rounds::summary(&table, &names);
    out.push('\n');
    out.push_str(&summary);
    println!("\n{out}");
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let doc = json!({
        "unix_time": stamp,
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "duration_s": args.duration,
        "fixed_rate_rps": args.rate,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "rows": rows,
        "summary": summary_json,
    });
    let path = args.out_dir.join("results.json");
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "{}", serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    println!("wrote {}", path.display());
    let _ = std::fs::remove_dir_all(&dir);
}
