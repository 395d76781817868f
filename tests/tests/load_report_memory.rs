//! What a proxy's load-report stream costs the control plane: the real binary, 2,000 report
//! streams on 20 connections (as each proxy's stream shares its ADS connection), each
//! reporting once per interval. The figure is printed (docs/operations.md quotes it); the
//! assertion is a guard against a regression by more than twice.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterStats, UpstreamLocalityStats};
use envoy_types::pb::envoy::service::load_stats::v3::LoadStatsRequest;
use envoy_types::pb::envoy::service::load_stats::v3::load_reporting_service_client::LoadReportingServiceClient;
use outrigger_tests::clients::get;
use outrigger_tests::{eventually, free_addr, metric, temp_path, workspace_binary};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const CONNECTIONS: usize = 20;
const STREAMS_PER_CONNECTION: usize = 100;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

fn report() -> LoadStatsRequest {
    LoadStatsRequest {
        node: None,
        cluster_stats: vec![ClusterStats {
            cluster_name: "b.default".into(),
            upstream_locality_stats: vec![UpstreamLocalityStats {
                total_successful_requests: 10,
                total_issued_requests: 10,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_stream_costs_the_control_plane_a_few_kilobytes() {
    let mesh = temp_path("mesh.yaml");
    std::fs::write(
        &mesh,
        "services:\n  - name: a\n    endpoints: [{address: \"127.0.0.1:9\"}]\n  - name: b\n    endpoints: [{address: \"127.0.0.1:9\"}]\n",
    )
    .unwrap();
    let (xds, admin) = (free_addr(), free_addr());
    let cp = Killed(
        Command::new(workspace_binary("outrigger-control-plane"))
            .args(["serve", "--workers", "1", "--load-report-interval", "1s"])
            .arg("--mesh")
            .arg(&mesh)
            .args(["--xds", &xds.to_string(), "--admin", &admin.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = cp.0.id();
    eventually(
        "the control plane serves",
        Duration::from_secs(10),
        || async move { tokio::net::TcpStream::connect(admin).await.ok().map(|_| ()) },
    )
    .await;

    // Opens `n` streams on `client`, each answered once; returns their senders.
    async fn open(
        client: &mut LoadReportingServiceClient<tonic::transport::Channel>,
        n: usize,
        keep: &mut Vec<(
            mpsc::Sender<LoadStatsRequest>,
            tonic::Streaming<envoy_types::pb::envoy::service::load_stats::v3::LoadStatsResponse>,
        )>,
    ) {
        for i in 0..n {
            let (tx, rx) = mpsc::channel(2);
            tx.send(LoadStatsRequest {
                node: Some(Node {
                    id: format!("a-{i}"),
                    cluster: "a".into(),
                    ..Default::default()
                }),
                cluster_stats: vec![],
            })
            .await
            .unwrap();
            let mut answers = client
                .stream_load_stats(ReceiverStream::new(rx))
                .await
                .unwrap()
                .into_inner();
            answers.message().await.unwrap().expect("an answer");
            keep.push((tx, answers));
        }
    }

    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(
            LoadReportingServiceClient::connect(format!("http://{xds}"))
                .await
                .unwrap(),
        );
    }
    // One stream per connection first: what the connections cost is not the streams'.
    let mut keep = Vec::new();
    for c in &mut clients {
        open(c, 1, &mut keep).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid);
    for c in &mut clients {
        open(c, STREAMS_PER_CONNECTION - 1, &mut keep).await;
    }
    // Every stream reports, twice, an interval apart.
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        for (tx, _) in &keep {
            tx.send(report()).await.unwrap();
        }
    }
    let streams = keep.len() as u64;
    eventually(
        "every report read",
        Duration::from_secs(20),
        || async move {
            let page = get(admin, "/metrics").await.body;
            (metric(
                &page,
                "outrigger_cp_load_reports_total{result=\"accepted\"}",
            ) >= 2 * streams)
                .then_some(())
        },
    )
    .await;
    let after = rss_kib(pid);
    let added = streams - CONNECTIONS as u64;
    let per_stream = (after.saturating_sub(before) * 1024) / added;
    println!(
        "control plane RSS {before} KiB with {CONNECTIONS} streams, {after} KiB with {streams}: {per_stream} bytes per report stream"
    );
    assert!(per_stream < 16 * 1024, "{per_stream} bytes per stream");
}
