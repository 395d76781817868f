//! `outrigger-bench xds-scale`: one control plane (one worker thread) against thousands of
//! simulated ADS streams.
//!
//! Each simulated proxy is a lightweight state-of-the-world client: it subscribes to CDS and
//! to the route table `outbound`, and ACKs everything. Each has an HTTP/2 connection of its
//! own, as sidecars connect (`--per-connection N` multiplexes N streams on one instead). After every
//! stream holds the first config, the harness edits the mesh file (one route weight, so only
//! RDS changes) and times each stream's receipt of the new route table.
//!
//! Reported: time from the file edit to the last stream's new config (p50, p99, max, which
//! include the control plane's file polling and debounce, up to 300 ms), control-plane RSS per
//! stream, and control-plane CPU for the whole push and per stream.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::{Cp, cpu_seconds, free_port, memory_kib, percentile, wait_for_port};

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
const SERVICES: usize = 20;

fn mesh(canary_weight: u32) -> String {
    let mut s = String::from("services:\n");
    for i in 0..SERVICES {
        s.push_str(&format!(
            "  - name: svc-{i}\n    endpoints: [{{address: \"127.0.0.1:{}\"}}]\n    routes:\n      - backends: [{{service: svc-{i}, weight: 100}}, {{service: svc-{}, weight: {canary_weight}}}]\n",
            20000 + i,
            (i + 1) % SERVICES
        ));
    }
    s
}

/// One simulated proxy: subscribes, ACKs, and reports each route-table version it gets.
async fn simulated_proxy(
    channel: tonic::transport::Channel,
    id: usize,
    events: mpsc::UnboundedSender<(usize, String, Instant)>,
) -> Result<(), tonic::Status> {
    let (tx, rx) = mpsc::channel(8);
    let node = Node {
        id: format!("sim-{id}"),
        cluster: "sim".into(),
        ..Default::default()
    };
    let req =
        |type_url: &str, names: Vec<String>, version: String, nonce: String, node: Option<Node>| {
            DiscoveryRequest {
                version_info: version,
                node,
                resource_names: names,
                type_url: type_url.into(),
                response_nonce: nonce,
                ..Default::default()
            }
        };
    let _ = tx
        .send(req(CDS, vec![], String::new(), String::new(), Some(node)))
        .await;
    let _ = tx
        .send(req(
            RDS,
            vec!["outbound".into()],
            String::new(),
            String::new(),
            None,
        ))
        .await;
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let mut inbound = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(resp) = inbound.message().await? {
        let names = if resp.type_url == RDS {
            vec!["outbound".to_string()]
        } else {
            vec![]
        };
        if resp.type_url == RDS {
            let _ = events.send((id, resp.version_info.clone(), Instant::now()));
        }
        let _ = tx
            .send(req(
                &resp.type_url,
                names,
                resp.version_info,
                resp.nonce,
                None,
            ))
            .await;
    }
    Ok(())
}

pub fn run(args: &[String], out_dir: &Path) {
    let mut counts = vec![1000usize, 10000];
    let mut cp_bin = PathBuf::from("target/release/outrigger-control-plane");
    let mut per_connection = 1usize;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--streams" => {
                counts = it
                    .next()
                    .expect("--streams N[,N]")
                    .split(',')
                    .map(|n| n.parse().expect("a number"))
                    .collect()
            }
            "--control-plane" => cp_bin = it.next().expect("--control-plane PATH").into(),
            "--per-connection" => {
                per_connection = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n > 0)
                    .expect("--per-connection N")
            }
            other => panic!(
                "unknown flag {other}; flags: --streams N[,N] --control-plane PATH --per-connection N"
            ),
        }
    }
    // The harness's own streams run on one thread, so the other core is the control plane's.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for &n in &counts {
        let dir =
            std::env::temp_dir().join(format!("outrigger-xds-scale-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mesh_path = dir.join("mesh.yaml");
        std::fs::write(&mesh_path, mesh(1)).unwrap();
        let (xds, admin) = (free_port(), free_port());
        let cp = Cp::serve(&cp_bin, &mesh_path, (xds, admin), &[]);
        wait_for_port(xds);
        std::thread::sleep(Duration::from_millis(300));
        let pid = cp.0.id();
        let rss_before = memory_kib(pid, "VmRSS:");

        let row = rt.block_on(async {
            let (events_tx, mut events) = mpsc::unbounded_channel();
            let connections = n.div_ceil(per_connection);
            let started = Instant::now();
            for c in 0..connections {
                let channel = tonic::transport::Endpoint::from_shared(format!("http://{xds}"))
                    .unwrap()
                    .connect()
                    .await
                    .expect("connect to the control plane");
                for s in 0..per_connection.min(n - c * per_connection) {
                    let id = c * per_connection + s;
                    tokio::spawn(simulated_proxy(channel.clone(), id, events_tx.clone()));
                }
            }
            // Every stream holds the first route table.
            let mut first = vec![None; n];
            let mut have = 0;
            while have < n {
                let (id, version, _) = events.recv().await.unwrap();
                if first[id].is_none() {
                    first[id] = Some(version);
                    have += 1;
                }
            }
            let initial_sync = started.elapsed();
            let rss_after = memory_kib(pid, "VmRSS:");

            let cpu_before = cpu_seconds(pid);
            let edited = Instant::now();
            std::fs::write(&mesh_path, mesh(2)).unwrap();
            let mut latencies = Vec::with_capacity(n);
            let mut done = vec![false; n];
            while latencies.len() < n {
                let (id, version, at) = events.recv().await.unwrap();
                if !done[id] && Some(&version) != first[id].as_ref() {
                    done[id] = true;
                    latencies.push(at - edited);
                }
            }
            // Let the last ACKs land before reading the CPU clock.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let cpu = cpu_seconds(pid) - cpu_before;
            latencies.sort();
            (initial_sync, rss_after, latencies, cpu)
        });
        let (initial_sync, rss_after, latencies, cpu) = row;
        // `/status` with every node registered: the median of three reads, start to last byte.
        let mut status_reads: Vec<(Duration, usize)> = (0..3).map(|_| read_status(admin)).collect();
        status_reads.sort();
        let (status_time, status_bytes) = status_reads[1];
        let per_stream_kib = rss_after.saturating_sub(rss_before) as f64 / n as f64;
        let (p50, p99, max) = (
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99),
            latencies[n - 1],
        );
        println!(
            "{n:>6} streams ({per_connection}/connection)  initial sync {:>7.0} ms  edit→new config p50 {:>6.0} ms  p99 {:>6.0} ms  max {:>6.0} ms  RSS {:.1} KiB/stream ({:.1} MB total)  CPU {:.0} ms per push ({:.1} µs/stream)",
            initial_sync.as_secs_f64() * 1e3,
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3,
            per_stream_kib,
            rss_after as f64 / 1024.0,
            cpu * 1e3,
            cpu * 1e6 / n as f64
        );
        println!(
            "{n:>6} nodes    GET /status {:.0} ms ({:.1} MB)",
            status_time.as_secs_f64() * 1e3,
            status_bytes as f64 / 1e6
        );
        rows.push(json!({
            "streams": n,
            "streams_per_connection": per_connection,
            "control_plane_workers": 1,
            "services": SERVICES,
            "initial_sync_ms": initial_sync.as_secs_f64() * 1e3,
            "push_p50_ms": p50.as_secs_f64() * 1e3,
            "push_p99_ms": p99.as_secs_f64() * 1e3,
            "push_max_ms": max.as_secs_f64() * 1e3,
            "rss_kib_per_stream": per_stream_kib,
            "rss_mb_total": rss_after as f64 / 1024.0,
            "cpu_ms_per_push": cpu * 1e3,
            "cpu_us_per_stream_push": cpu * 1e6 / n as f64,
            "status_ms": status_time.as_secs_f64() * 1e3,
            "status_bytes": status_bytes,
        }));
        drop(cp);
        let _ = std::fs::remove_dir_all(&dir);
    }
    let path = out_dir.join("xds-scale.json");
    std::fs::create_dir_all(out_dir).unwrap();
    let doc = json!({"command": std::env::args().collect::<Vec<_>>().join(" "), "rows": rows});
    std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap() + "\n").unwrap();
    println!("wrote {}", path.display());
}

/// One `GET /status` from the control plane's admin port: how long, and how many bytes.
fn read_status(admin: std::net::SocketAddr) -> (Duration, usize) {
    use std::io::{Read, Write};
    let started = Instant::now();
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.write_all(b"GET /status HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = Vec::new();
    s.read_to_end(&mut body).unwrap();
    (started.elapsed(), body.len())
}
