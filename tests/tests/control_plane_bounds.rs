//! What one ADS client can make the control plane hold, over the real gRPC port: oversized
//! names are refused, one node cannot open streams without end, and whatever a node calls
//! itself cannot break the metrics page.

use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use outrigger_control_plane::app::ControlPlane;
use outrigger_tests::clients::get;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

async fn control_plane() -> ControlPlane {
    outrigger_tests::control_plane(
        r#"services:
  - name: a
    endpoints: [{address: "127.0.0.1:9"}]
"#,
    )
    .await
}

/// Opens one ADS stream as `node` asking for clusters; returns its first answer, or the
/// status that ended it, and the sender that keeps it open.
async fn open_stream(
    cp: &ControlPlane,
    node: &str,
) -> (
    Result<DiscoveryResponse, tonic::Status>,
    mpsc::Sender<DiscoveryRequest>,
) {
    open_stream_of(cp, node, "a").await
}

/// As `open_stream`, for a node of service `cluster`.
async fn open_stream_of(
    cp: &ControlPlane,
    node: &str,
    cluster: &str,
) -> (
    Result<DiscoveryResponse, tonic::Status>,
    mpsc::Sender<DiscoveryRequest>,
) {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", cp.xds_addr))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: node.into(),
            cluster: cluster.into(),
            ..Default::default()
        }),
        type_url: CDS.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let answer = async {
        let mut inbound = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        match inbound.message().await? {
            Some(r) => Ok(r),
            None => Err(tonic::Status::unknown("the stream ended")),
        }
    };
    let answer = tokio::time::timeout(Duration::from_secs(5), answer)
        .await
        .expect("an answer or an error");
    (answer, tx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_node_id_is_refused() {
    let cp = control_plane().await;
    let (answer, _keep) = open_stream(&cp, &"n".repeat(10_000)).await;
    let status = answer.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let status_page = get(cp.admin_addr, "/status").await.body;
    assert!(
        !status_page.contains("nnnnnnnnnn"),
        "the node was registered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_node_cannot_open_streams_without_end() {
    let cp = control_plane().await;
    let mut held = Vec::new();
    for _ in 0..outrigger_control_plane::xds_limits::MAX_STREAMS_PER_NODE {
        let (answer, keep) = open_stream(&cp, "greedy").await;
        assert!(answer.is_ok(), "{answer:?}");
        held.push(keep);
    }
    let (answer, _keep) = open_stream(&cp, "greedy").await;
    assert_eq!(answer.unwrap_err().code(), tonic::Code::ResourceExhausted);
    // Another node is not affected.
    let (answer, _keep) = open_stream(&cp, "modest").await;
    assert!(answer.is_ok(), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_id_cannot_inject_metric_lines() {
    let cp = control_plane().await;
    let evil = "x\"} 1\noutrigger_cp_injected_total 99\n#";
    let (answer, tx) = open_stream(&cp, evil).await;
    let first = answer.unwrap();
    // A NACK, so the node shows in the per-node series.
    tx.send(DiscoveryRequest {
        type_url: CDS.into(),
        version_info: String::new(),
        response_nonce: first.nonce.clone(),
        error_detail: Some(envoy_types::pb::google::rpc::Status {
            code: 3,
            message: "no".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let admin = cp.admin_addr;
    let page = outrigger_tests::eventually(
        "the NACK is counted",
        Duration::from_secs(5),
        || async move {
            let page = get(admin, "/metrics").await.body;
            page.contains("outrigger_cp_nacks_total{node=")
                .then_some(page)
        },
    )
    .await;
    assert!(
        !page
            .lines()
            .any(|l| l.starts_with("outrigger_cp_injected_total")),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_change_nothing_rebuild_nothing() {
    let cp = control_plane().await;
    let (answer, tx) = open_stream(&cp, "chatty").await;
    let first = answer.unwrap();
    let admin = cp.admin_addr;
    let views = || async move {
        let page = get(admin, "/metrics").await.body;
        outrigger_tests::metric(&page, "outrigger_cp_views_built_total")
    };
    let before = views().await;
    // The same ACK, over and over: nothing changes.
    for _ in 0..200 {
        tx.send(DiscoveryRequest {
            type_url: CDS.into(),
            version_info: first.version_info.clone(),
            response_nonce: first.nonce.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // A second stream's first request, from another service, builds one view, and is handled
    // after the first stream's (the channel above holds 4 at most, so at least 196 were read
    // already).
    let (second, _keep) = open_stream_of(&cp, "second", "b").await;
    assert!(second.is_ok());
    let after = views().await;
    assert!(
        after <= before + 1,
        "{before} → {after}: unchanged requests rebuilt the view"
    );
    assert!(after > before, "the second stream built its view");
    // A replica of a service already seen shares its view: it builds none.
    let (third, _keep) = open_stream_of(&cp, "third", "b").await;
    assert!(third.is_ok());
    assert_eq!(views().await, after, "a replica built a view of its own");
}

/// A client's NACK is recorded against its node and type, with the client's message, in
/// `/status` and in the NACK counter; the version it names is the one still in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_is_recorded_with_its_message() {
    let cp = control_plane().await;
    let (answer, tx) = open_stream(&cp, "nacker").await;
    let answer = answer.unwrap();
    tx.send(DiscoveryRequest {
        type_url: CDS.into(),
        response_nonce: answer.nonce.clone(),
        error_detail: Some(envoy_types::pb::google::rpc::Status {
            code: 3,
            message: "cluster `a.default`: field `lb_policy` is not supported".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let admin = cp.admin_addr;
    let nack = outrigger_tests::eventually(
        "/status shows the NACK",
        Duration::from_secs(5),
        || async move {
            let status: serde_json::Value =
                serde_json::from_str(&get(admin, "/status").await.body).ok()?;
            let nack = status["nodes"]["nacker"]["types"]["Cluster"]["last_nack"].clone();
            nack.is_object().then_some(nack)
        },
    )
    .await;
    assert_eq!(
        nack["message"], "cluster `a.default`: field `lb_policy` is not supported",
        "{nack}"
    );
    let metrics = get(admin, "/metrics").await.body;
    assert!(
        metrics.contains("outrigger_cp_nacks_total{node=\"nacker\"} 1"),
        "{metrics}"
    );
}
