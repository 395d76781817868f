//! What a load-reporting client can make the control plane hold, over the real gRPC port:
//! garbage, oversized and too frequent reports are cut off and counted, a report cannot
//! make up services, and the graph stays within its bound.

use std::time::Duration;

use bytes::{BufMut, BytesMut};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterStats, UpstreamLocalityStats};
use envoy_types::pb::envoy::service::load_stats::v3::load_reporting_service_client::LoadReportingServiceClient;
use envoy_types::pb::envoy::service::load_stats::v3::{LoadStatsRequest, LoadStatsResponse};
use outrigger_control_plane::app::ControlPlane;
use outrigger_control_plane::service_graph::Limits;
use outrigger_tests::clients::get;
use outrigger_tests::metric;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// The report interval `mesh_traffic::control_plane` sets.
const INTERVAL: Duration = Duration::from_secs(1);

async fn control_plane() -> ControlPlane {
    outrigger_tests::mesh_traffic::control_plane(
        r#"services:
  - name: a
    endpoints: [{address: "127.0.0.1:9"}]
  - name: b
    endpoints: [{address: "127.0.0.1:9"}]
"#,
    )
    .await
}

/// Opens a report stream as a node of `service`; returns the first answer (or the status that
/// ended the stream), the answers to come, and the sender of further reports.
async fn open(
    cp: &ControlPlane,
    service: &str,
) -> (
    Result<LoadStatsResponse, tonic::Status>,
    Option<Streaming<LoadStatsResponse>>,
    mpsc::Sender<LoadStatsRequest>,
) {
    let mut client = LoadReportingServiceClient::connect(format!("http://{}", cp.xds_addr))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(64);
    tx.send(LoadStatsRequest {
        node: Some(Node {
            id: format!("{service}-1"),
            cluster: service.into(),
            ..Default::default()
        }),
        cluster_stats: vec![],
    })
    .await
    .unwrap();
    let opened = tokio::time::timeout(
        Duration::from_secs(5),
        client.stream_load_stats(ReceiverStream::new(rx)),
    )
    .await
    .expect("an answer");
    match opened {
        Err(status) => (Err(status), None, tx),
        Ok(resp) => {
            let mut answers = resp.into_inner();
            let first = answers
                .message()
                .await
                .and_then(|m| m.ok_or_else(|| tonic::Status::unknown("ended")));
            (first, Some(answers), tx)
        }
    }
}

/// How the stream ends: the status of its next error.
async fn end_of(mut answers: Streaming<LoadStatsResponse>) -> tonic::Status {
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match answers.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return tonic::Status::ok("ended without an error"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the stream is cut off")
}

fn cluster(name: String, requests: u64) -> ClusterStats {
    ClusterStats {
        cluster_name: name,
        upstream_locality_stats: vec![UpstreamLocalityStats {
            total_successful_requests: requests,
            total_issued_requests: requests,
            ..Default::default()
        }],
        ..Default::default()
    }
}

async fn counted(cp: &ControlPlane, result: &str) -> u64 {
    let page = get(cp.admin_addr, "/metrics").await.body;
    metric(
        &page,
        &format!("outrigger_cp_load_reports_total{{result=\"{result}\"}}"),
    )
}

async fn graph_bytes(cp: &ControlPlane) -> u64 {
    metric(
        &get(cp.admin_addr, "/metrics").await.body,
        "outrigger_cp_graph_bytes",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_that_is_not_protobuf_is_cut_off_and_counted() {
    let cp = control_plane().await;
    let tcp = tokio::net::TcpStream::connect(cp.xds_addr).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut h2 = h2.ready().await.unwrap();
    let req = http::Request::post(format!(
        "http://{}/envoy.service.load_stats.v3.LoadReportingService/StreamLoadStats",
        cp.xds_addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap();
    let (resp, mut body) = h2.send_request(req, false).unwrap();
    // A gRPC frame whose 64 bytes are no protobuf (field 0 with a bad wire type).
    let mut frame = BytesMut::new();
    frame.put_u8(0);
    frame.put_u32(64);
    frame.put_slice(&[0xff; 64]);
    body.send_data(frame.freeze(), false).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .unwrap()
        .unwrap();
    let status = match resp.headers().get("grpc-status") {
        Some(s) => s.to_str().unwrap().to_string(),
        None => {
            let mut recv = resp.into_body();
            while recv.data().await.is_some() {}
            let trailers = recv.trailers().await.unwrap().expect("trailers");
            trailers["grpc-status"].to_str().unwrap().to_string()
        }
    };
    assert_ne!(status, "0", "garbage was taken");
    assert_eq!(counted(&cp, "malformed").await, 1);
    assert_eq!(graph_bytes(&cp).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_report_is_cut_off_and_counted() {
    let cp = control_plane().await;
    let (first, answers, tx) = open(&cp, "a").await;
    let first = first.expect("a node of a service may report");
    assert!(first.send_all_clusters && first.load_reporting_interval.is_some());
    tx.send(LoadStatsRequest {
        node: None,
        cluster_stats: vec![cluster("b".repeat(2 * 1024 * 1024), 1)],
    })
    .await
    .unwrap();
    let status = end_of(answers.unwrap()).await;
    assert_ne!(status.code(), tonic::Code::Ok, "{status:?}");
    assert_eq!(counted(&cp, "too_large").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_clusters_or_implausible_counts_are_cut_off() {
    let cp = control_plane().await;
    let (_, answers, tx) = open(&cp, "a").await;
    tokio::time::sleep(INTERVAL).await;
    let many = (0..2000).map(|i| cluster(format!("c{i}"), 1)).collect();
    tx.send(LoadStatsRequest {
        node: None,
        cluster_stats: many,
    })
    .await
    .unwrap();
    let status = end_of(answers.unwrap()).await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");

    let (_, answers, tx) = open(&cp, "a").await;
    tokio::time::sleep(INTERVAL).await;
    tx.send(LoadStatsRequest {
        node: None,
        cluster_stats: vec![cluster("b.default".into(), u64::MAX / 2)],
    })
    .await
    .unwrap();
    let status = end_of(answers.unwrap()).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // A route's name is bounded like any other.
    let (_, answers, tx) = open(&cp, "a").await;
    tokio::time::sleep(INTERVAL).await;
    let mut long_route = cluster("b.default".into(), 1);
    long_route.cluster_service_name = format!("outrigger.io/route/{}", "r".repeat(300));
    tx.send(LoadStatsRequest {
        node: None,
        cluster_stats: vec![long_route],
    })
    .await
    .unwrap();
    let status = end_of(answers.unwrap()).await;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(counted(&cp, "too_large").await, 3);
    assert_eq!(graph_bytes(&cp).await, 0, "nothing of either was kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_cannot_make_up_services() {
    let cp = control_plane().await;
    let (_, _answers, tx) = open(&cp, "a").await;
    for round in 0..3 {
        // Once per interval, as a proxy would.
        tokio::time::sleep(INTERVAL).await;
        let made_up = (0..500)
            .map(|i| cluster(format!("invented-{round}-{i}"), 10))
            .collect();
        tx.send(LoadStatsRequest {
            node: None,
            cluster_stats: made_up,
        })
        .await
        .unwrap();
    }
    outrigger_tests::eventually("three reports read", Duration::from_secs(5), || async {
        (counted(&cp, "accepted").await == 3).then_some(())
    })
    .await;
    assert_eq!(counted(&cp, "unknown_cluster").await, 1500);
    assert_eq!(graph_bytes(&cp).await, 0);
    let graph = get(cp.admin_addr, "/graph?window=10s").await.body;
    assert!(!graph.contains("invented"), "{graph}");

    // A node that is no service of the mesh may not report at all.
    let (refused, _, _) = open(&cp, "nobody").await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::FailedPrecondition);
    assert_eq!(counted(&cp, "unknown_caller").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_reports_is_cut_off_and_the_graph_stays_within_its_bound() {
    let cp = control_plane().await;
    let (_, answers, tx) = open(&cp, "a").await;
    tokio::time::sleep(INTERVAL).await;
    for _ in 0..20 {
        if tx
            .send(LoadStatsRequest {
                node: None,
                cluster_stats: vec![cluster("b.default".into(), 5)],
            })
            .await
            .is_err()
        {
            break;
        }
    }
    let status = end_of(answers.unwrap()).await;
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        counted(&cp, "accepted").await,
        1,
        "only the first in its interval"
    );
    assert!(counted(&cp, "too_frequent").await >= 10);
    // The one accepted report made one edge, within the stated bound per edge.
    let bound = Limits::default().bytes_per_edge() as u64;
    let held = graph_bytes(&cp).await;
    assert!(held > 0 && held <= bound, "{held} bytes against {bound}");
}
