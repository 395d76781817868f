//! A sidecar's inbound side set by the control plane over LDS: its mTLS mode and who may
//! call it on which paths change live, under load, with no request lost, and go back to the
//! sidecar's own settings when the mesh stops saying anything.
//!
//! web and batch → (their outbound proxies, mTLS) → api's inbound proxy (`lds: inbound`,
//! node of service `api`) → app.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use outrigger_control_plane::app;
use outrigger_control_plane::ca::{Ca, DEFAULT_LIFETIME};
use outrigger_core::spiffe::SpiffeId;
use outrigger_tests::clients::{TestClient, get};
use outrigger_tests::{TestProxy, eventually, identity_yaml, temp_path, upstreams, write_identity};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const API: &str = "spiffe://cluster.local/ns/shop/sa/api";

fn identity(ca: &Ca, id: &str) -> String {
    let (chain, key) = ca
        .issue(&SpiffeId::parse(id).unwrap(), DEFAULT_LIFETIME)
        .unwrap();
    identity_yaml(&write_identity(&chain, &key, ca.bundle_pem()))
}

/// The mesh: `api` with `inbound` (its `tls_mode` and `authorization` lines, if any).
fn mesh(inbound: &str) -> String {
    format!(
        r#"mesh: {{trust_domain: cluster.local}}
services:
  - name: api
    namespace: shop
{inbound}"#
    )
}

/// api's sidecar: permissive on its own, taking its policy from the control plane.
async fn api_sidecar(ca: &Ca, xds: SocketAddr, app: SocketAddr) -> TestProxy {
    TestProxy::start(&format!(
        r#"{identity}admin:
  address: 127.0.0.1:0
xds: {{address: "{xds}", node: api-0, service: api}}
listeners:
  - name: inbound
    address: 127.0.0.1:0
    direction: inbound
    tls: {{mode: permissive}}
    lds: inbound
    virtual_hosts:
      - name: app
        domains: ['*']
        routes:
          - backends: [{{cluster: app}}]
clusters:
  - name: app
    endpoints: [{{address: "{app}"}}]
"#,
        identity = identity(ca, API)
    ))
    .await
}

/// A caller's outbound proxy, running as `account`, whose every request goes to api over
/// mTLS.
async fn caller(ca: &Ca, account: &str, api: SocketAddr) -> TestClient {
    let proxy = TestProxy::start(&format!(
        r#"{identity}admin:
  address: 127.0.0.1:0
listeners:
  - name: outbound
    address: 127.0.0.1:0
    direction: outbound
    virtual_hosts:
      - name: api
        domains: ['*']
        routes:
          - backends: [{{cluster: api}}]
            retry: {{attempts: 0}}
clusters:
  - name: api
    tls: {{identities: ["{API}"]}}
    endpoints: [{{address: "{api}"}}]
"#,
        identity = identity(ca, &format!("spiffe://cluster.local/ns/shop/sa/{account}"))
    ))
    .await;
    let client = TestClient::http1(proxy.addr("outbound"));
    // The proxy lives as long as the test.
    std::mem::forget(proxy);
    client
}

/// The sum of every series of `family` on a proxy's metrics page.
async fn total(admin: SocketAddr, family: &str) -> u64 {
    let page = get(admin, "/metrics").await.body;
    page.lines()
        .filter(|l| l.starts_with(family))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn status(client: &TestClient, path: &str) -> u16 {
    client
        .get("api", path)
        .await
        .map_or(0, |r| r.status.as_u16())
}

async fn start_cp(text: &str) -> (app::ControlPlane, PathBuf) {
    let path = temp_path("mesh.yaml");
    std::fs::write(&path, text).unwrap();
    let cp = app::start(app::Options {
        mesh_path: path.clone(),
        xds_address: "127.0.0.1:0".parse().unwrap(),
        admin_address: "127.0.0.1:0".parse().unwrap(),
        identity: Default::default(),
        load_reports: Default::default(),
    })
    .await
    .unwrap();
    (cp, path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_mode_and_authorization_follow_the_control_plane_live() {
    let ca = Ca::generate("cluster.local").unwrap();
    let app = upstreams::http("api-app").await;
    let only_web_reads = r#"    authorization:
      allow:
        - from: [{service_account: web}]
          paths: ["/api/*"]
          methods: [GET]
"#;
    let (cp, mesh_path) = start_cp(&mesh(only_web_reads)).await;
    let api = api_sidecar(&ca, cp.xds_addr, app.addr).await;
    let inbound = api.addr("inbound");
    let web = caller(&ca, "web", inbound).await;
    let batch = caller(&ca, "batch", inbound).await;
    let plaintext = TestClient::http1(inbound);

    let web_ref = &web;
    eventually(
        "api's sidecar takes the mesh's authorization",
        Duration::from_secs(10),
        || async move { (status(web_ref, "/admin").await == 403).then_some(()) },
    )
    .await;
    assert_eq!(status(&web, "/api/items").await, 200);
    assert_eq!(status(&web, "/api/../admin").await, 403, "judged as /admin");
    assert_eq!(status(&batch, "/api/items").await, 403);
    assert_eq!(status(&plaintext, "/api/items").await, 403, "no identity");
    assert!(total(api.admin(), "outrigger_authorization_denied_total").await >= 4);

    // Under load from web, the mesh turns api strict and lets batch in too.
    let (stop, sent, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let load = {
        let (stop, sent, failed, web) = (stop.clone(), sent.clone(), failed.clone(), web.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let s = status(&web, "/api/items").await;
                sent.fetch_add(1, Ordering::Relaxed);
                if s != 200 {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    std::fs::write(
        &mesh_path,
        mesh(&format!(
            "    tls_mode: strict\n{only_web_reads}        - from: [{{service_account: batch}}]\n"
        )),
    )
    .unwrap();
    let batch_ref = &batch;
    eventually("batch is let in", Duration::from_secs(2), || async move {
        (status(batch_ref, "/admin").await == 200).then_some(())
    })
    .await;
    // Strict: a new plaintext connection is closed, and one opened before is refused.
    let plain = &plaintext;
    eventually(
        "plaintext is refused",
        Duration::from_secs(2),
        || async move { (status(plain, "/api/items").await == 403).then_some(()) },
    )
    .await;
    assert_eq!(status(&TestClient::http1(inbound), "/api/items").await, 0);

    // The mesh says nothing again: the sidecar's own settings (permissive, no rules) apply.
    std::fs::write(&mesh_path, mesh("")).unwrap();
    eventually(
        "a plaintext caller is let in again",
        Duration::from_secs(2),
        || async move { (status(plain, "/admin").await == 200).then_some(()) },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(sent > 50, "only {sent} requests under load");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed across the changes"
    );
    assert_eq!(
        total(api.admin(), "outrigger_xds_nacks_total").await,
        0,
        "every Listener was accepted"
    );
    let s: serde_json::Value =
        serde_json::from_str(&get(cp.admin_addr, "/status").await.body).expect("status is JSON");
    assert!(s.to_string().contains("Listener"), "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_services_policy_is_never_served() {
    let (cp, _) = start_cp(&mesh(
        "    authorization: {allow: [{from: [{namespace: shop}]}]}\n",
    ))
    .await;
    // A node of another service asks for api's kept Listener by its internal name, and
    // for `inbound`, which is only ever its own.
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{}", cp.xds_addr))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: "web-0".into(),
            cluster: "web".into(),
            ..Default::default()
        }),
        type_url: LDS.into(),
        resource_names: vec!["inbound@api.shop".into(), "inbound".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut stream = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let answer = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("an answer")
        .unwrap()
        .expect("a response");
    assert_eq!(answer.type_url, LDS);
    assert!(answer.resources.is_empty(), "{:?}", answer.resources);
}

const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
