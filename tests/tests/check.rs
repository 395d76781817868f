//! `outrigger-control-plane check` (the real binary) against a running control plane: each
//! failure it finds is made real here, and each gives one line with a hint and a failing exit.
//! `proxy-status` and `proxy-config` are read back from the same mesh.

use std::net::SocketAddr;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::google::rpc::Status as RpcStatus;
use outrigger_control_plane::app::{self, ControlPlane};
use outrigger_core::sign_api::SignRequest;
use outrigger_proxy::identity::api;
use outrigger_tests::{TestProxy, eventually, free_addr, temp_path, workspace_binary, xds_config};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

const HEALTHY: &str = r#"mesh: {trust_domain: mesh.test}
services:
  - name: api
    namespace: shop
    tokens: [{token: api-token}]
    endpoints: [{address: "127.0.0.1:9"}]
"#;

async fn control_plane(
    mesh: &str,
    ca_dir: Option<std::path::PathBuf>,
) -> (ControlPlane, std::path::PathBuf) {
    let path = temp_path("mesh.yaml");
    std::fs::write(&path, mesh).unwrap();
    let cp = app::start(app::Options {
        mesh_path: path.clone(),
        xds_address: "127.0.0.1:0".parse().unwrap(),
        admin_address: "127.0.0.1:0".parse().unwrap(),
        identity: app::IdentityOptions {
            ca_dir,
            ..Default::default()
        },
        load_reports: Default::default(),
    })
    .await
    .unwrap();
    (cp, path)
}

/// Runs a subcommand against `admin`: exit success and standard output.
async fn cli(args: &[&str], admin: SocketAddr) -> (bool, String) {
    let mut cmd = std::process::Command::new(workspace_binary("outrigger-control-plane"));
    cmd.args(args).args(["--admin", &admin.to_string()]);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap())
}

async fn check(admin: SocketAddr) -> (bool, String) {
    cli(&["check"], admin).await
}

/// Waits until `check` reports a problem whose line contains `needle`; returns the report.
async fn reported(admin: SocketAddr, needle: &str) -> String {
    eventually(
        &format!("check reports `{needle}`"),
        Duration::from_secs(15),
        || async {
            let (ok, out) = check(admin).await;
            (!ok && out.contains(needle)).then_some(out)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_mesh_checks_clean() {
    let (cp, _) = control_plane(HEALTHY, None).await;
    let (ok, out) = check(cp.admin_addr).await;
    assert!(ok, "{out}");
    assert!(out.starts_with("ok: 1 services"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_control_plane_is_reported_unreachable() {
    let (ok, out) = check(free_addr()).await;
    assert!(!ok);
    assert!(
        out.contains("[control-plane]") && out.contains("cannot reach"),
        "{out}"
    );
    assert!(out.contains("hint: start it"), "{out}");
    let (ok, out) = cli(&["check", "-o", "json"], free_addr()).await;
    assert!(!ok);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["problems"][0]["check"], "control-plane");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_file_error_names_the_file_and_line() {
    let (cp, path) = control_plane(HEALTHY, None).await;
    std::fs::write(&path, "services:\n  - name: api\n    endpoints: nope\n").unwrap();
    let out = reported(cp.admin_addr, "[mesh]").await;
    assert!(out.contains(&path.display().to_string()), "{out}");
    assert!(out.contains("line 3"), "{out}");
    assert!(out.contains("hint: fix the file"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_without_endpoints_and_a_route_to_it_are_reported() {
    let (cp, _) = control_plane(
        r#"services:
  - name: web
    endpoints: [{address: "127.0.0.1:9"}]
    routes:
      - name: to-empty
        match: {prefix: /new}
        backends: [{service: empty}]
  - name: empty
"#,
        None,
    )
    .await;
    let (ok, out) = check(cp.admin_addr).await;
    assert!(!ok);
    assert!(
        out.contains("[endpoints] empty.default: has no ready endpoint"),
        "{out}"
    );
    assert!(
        out.contains(
            "[routes] web.default/to-empty: leads only to services with no ready endpoint"
        ),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_root_near_its_expiry_is_reported() {
    // A root that ends in two days.
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    params.not_before = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(2);
    let cert = params.self_signed(&key).unwrap();
    let dir = temp_path("ca");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ca.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("ca.key"), key.serialize_pem()).unwrap();
    let (cp, _) = control_plane(HEALTHY, Some(dir)).await;
    let out = reported(cp.admin_addr, "[ca] root").await;
    assert!(
        out.contains("expires in 1d") || out.contains("expires in 2d"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_certificate_that_was_not_renewed_is_reported() {
    let (cp, _) = control_plane(HEALTHY, None).await;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    let id = "spiffe://mesh.test/ns/shop/sa/api";
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
    let req = SignRequest {
        csr: params.serialize_request(&key).unwrap().der().to_vec(),
        lifetime_seconds: 3,
    };
    api::sign(cp.xds_addr, None, "api-token", req, Duration::from_secs(5))
        .await
        .expect("signed");
    // Nobody renews it: within two seconds a third of its life is left, then none.
    let out = reported(cp.admin_addr, "[certificates]").await;
    assert!(out.contains(id), "{out}");
    let out = reported(cp.admin_addr, "expired").await;
    assert!(out.contains("none was signed since"), "{out}");
}

/// An ADS client as node `node` of `api`: asks for clusters and answers the first push with
/// `answer` (an ACK, a NACK, or nothing); keeps its stream open until dropped.
async fn ads_client(
    cp: &ControlPlane,
    node: &str,
    answer: Option<Option<&str>>,
) -> mpsc::Sender<DiscoveryRequest> {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", cp.xds_addr))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: node.into(),
            cluster: "api".into(),
            ..Default::default()
        }),
        type_url: CDS.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut inbound = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let first = inbound.message().await.unwrap().unwrap();
    if let Some(nack) = answer {
        tx.send(DiscoveryRequest {
            type_url: CDS.into(),
            version_info: if nack.is_some() {
                String::new()
            } else {
                first.version_info.clone()
            },
            response_nonce: first.nonce.clone(),
            error_detail: nack.map(|m| RpcStatus {
                code: 3,
                message: m.into(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    tokio::spawn(async move { while let Ok(Some(_)) = inbound.message().await {} });
    tx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_that_nack_lag_or_leave_are_reported_and_shown_by_proxy_status() {
    let (cp, _) = control_plane(HEALTHY, None).await;
    let _nacking = ads_client(&cp, "api-nack", Some(Some("cluster api.shop: bad field"))).await;
    let _silent = ads_client(&cp, "api-silent", None).await;
    let leaving = ads_client(&cp, "api-gone", Some(None)).await;
    drop(leaving);

    let out = reported(cp.admin_addr, "has not answered Cluster").await;
    assert!(
        out.contains("[proxies] api-nack: refuses Cluster version") && out.contains("bad field"),
        "{out}"
    );
    assert!(
        out.contains("[proxies] api-silent: has not answered"),
        "{out}"
    );
    assert!(out.contains("[proxies] api-gone: lost its stream"), "{out}");

    let (ok, table) = cli(&["proxy-status"], cp.admin_addr).await;
    assert!(ok);
    let row = |node: &str| {
        table
            .lines()
            .find(|l| l.starts_with(node))
            .unwrap()
            .to_string()
    };
    assert!(
        row("api-nack").contains("NACKED") && row("api-nack").contains("bad field"),
        "{table}"
    );
    assert!(row("api-silent").contains("STALE"), "{table}");
    assert!(
        row("api-gone").contains("gone") && row("api-gone").contains("SYNCED"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_config_shows_a_proxys_clusters_endpoints_and_routes() {
    let (cp, _) = control_plane(HEALTHY, None).await;
    let proxy = TestProxy::start(&xds_config(&format!(
        "address: \"{}\"\nnode: web-1\nservice: web",
        cp.xds_addr
    )))
    .await;
    let admin = proxy.admin().to_string();
    let run = |part: &'static str| {
        let admin = admin.clone();
        async move {
            let mut cmd = std::process::Command::new(workspace_binary("outrigger-control-plane"));
            cmd.args(["proxy-config", part, "--proxy", &admin]);
            let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
                .await
                .unwrap();
            assert!(out.status.success());
            String::from_utf8(out.stdout).unwrap()
        }
    };
    let clusters = eventually(
        "the proxy has its clusters",
        Duration::from_secs(10),
        || async {
            let out = run("clusters").await;
            out.contains("api.shop").then_some(out)
        },
    )
    .await;
    assert!(clusters.starts_with("CLUSTER"), "{clusters}");
    let endpoints = run("endpoints").await;
    assert!(
        endpoints.contains("127.0.0.1:9") && endpoints.contains("HEALTHY"),
        "{endpoints}"
    );
    let routes = run("routes").await;
    assert!(routes.contains("api.shop:"), "{routes}");
}
