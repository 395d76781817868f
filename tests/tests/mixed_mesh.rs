//! One mTLS mesh for an Envoy and our proxy, both configured only by the control plane:
//!
//! client → Envoy (the caller `web`'s sidecar) → mTLS → our proxy (the callee `api`'s
//! sidecar) → app.
//!
//! Envoy's only config is a bootstrap naming the control plane's mTLS ADS port and the files
//! `outrigger-proxy certs` keeps; its clusters, routes and listener come over ADS, and its
//! certificate and trust bundle over SDS. Our proxy takes its certificate from the CA and its
//! inbound mode and authorization over LDS. Each side checks the other's SPIFFE ID.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use outrigger_control_plane::app::{self, ControlPlane};
use outrigger_tests::clients::{TestClient, get};
use outrigger_tests::envoy::Envoy;
use outrigger_tests::{TestProxy, eventually, free_addr, temp_path, upstreams, workspace_binary};

const CONTROL_PLANE: &str = "spiffe://cluster.local/ns/outrigger/sa/control-plane";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
/// Short enough that both sides renew their certificates every two seconds or so.
const LIFETIME: &str = "4s";

/// `web` and `api`; `api` is strict, behind our proxy at `api_inbound`, and lets in what
/// `authorization` says.
fn mesh(outbound_port: u16, api_inbound: SocketAddr, authorization: &str) -> String {
    format!(
        r#"mesh: {{trust_domain: cluster.local, outbound_port: {outbound_port}}}
services:
  - name: api
    namespace: shop
    tls_mode: strict
    endpoints: [{{address: "{api_inbound}"}}]
    tokens: [{{token: token-api}}]
    authorization: {{allow: [{authorization}]}}
  - name: web
    namespace: shop
    tokens: [{{token: token-web}}]
"#
    )
}

/// Runs `outrigger-proxy certs` for `id` into a new directory, until dropped.
struct Certs {
    child: Child,
    dir: PathBuf,
}

impl Certs {
    fn start(ca: SocketAddr, anchor: &Path, id: &str, token: &str) -> Certs {
        Certs::start_with(ca, anchor, id, token, &["--lifetime", LIFETIME])
    }

    fn start_with(ca: SocketAddr, anchor: &Path, id: &str, token: &str, extra: &[&str]) -> Certs {
        let dir = temp_path("certs");
        let child = Command::new(workspace_binary("outrigger-proxy"))
            .args([
                "certs",
                "--ca-address",
                &ca.to_string(),
                "--id",
                id,
                "--token",
                token,
            ])
            .arg("--ca-trust-anchor")
            .arg(anchor)
            .arg("--dir")
            .arg(&dir)
            .args(extra)
            .spawn()
            .expect("outrigger-proxy certs starts");
        Certs { child, dir }
    }
}

impl Certs {
    /// Waits until the first certificate is written.
    async fn written(self) -> Certs {
        let key = self.dir.join("key.pem");
        eventually(
            "the certificate is written",
            Duration::from_secs(10),
            || {
                let key = key.clone();
                async move { key.exists().then_some(()) }
            },
        )
        .await;
        self
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The control plane on `mesh_path`, its mTLS port, and its root written as a trust anchor.
async fn control_plane_with_anchor(mesh_path: &Path) -> (ControlPlane, SocketAddr, PathBuf) {
    let cp = control_plane(mesh_path).await;
    let secure = cp.secure_xds_addr.unwrap();
    let anchor = temp_path("ca-root.pem");
    std::fs::write(&anchor, cp.ca.load().bundle_pem()).unwrap();
    (cp, secure, anchor)
}

async fn control_plane(mesh_path: &Path) -> ControlPlane {
    app::start(app::Options {
        mesh_path: mesh_path.to_path_buf(),
        xds_address: "127.0.0.1:0".parse().unwrap(),
        admin_address: "127.0.0.1:0".parse().unwrap(),
        identity: app::IdentityOptions {
            secure_xds_address: Some("127.0.0.1:0".parse().unwrap()),
            // A gRPC app's xDS client checks the host it dials.
            server_names: vec!["127.0.0.1".into()],
            ..Default::default()
        },
        // Envoys and our proxies report load every second.
        load_reports: outrigger_control_plane::service_graph::Limits {
            interval: Duration::from_secs(1),
            ..Default::default()
        },
    })
    .await
    .unwrap()
}

/// api's sidecar: its certificate from the CA, everything else from the control plane.
async fn api_sidecar(
    secure: SocketAddr,
    anchor: &Path,
    inbound: SocketAddr,
    app: SocketAddr,
) -> TestProxy {
    TestProxy::start(&format!(
        r#"admin: {{address: 127.0.0.1:0}}
identity:
  ca: {{address: "{secure}", token: token-api, id: "{API}", trust_anchor: "{anchor}", lifetime: {LIFETIME}}}
xds: {{address: "{secure}", node: api-0, service: api, identity: "{CONTROL_PLANE}"}}
listeners:
  - name: inbound
    address: "{inbound}"
    direction: inbound
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
        anchor = anchor.display()
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envoy_caller_and_our_callee_share_one_mtls_mesh_set_by_the_control_plane() {
    let app = upstreams::http("api-app").await;
    let (outbound, inbound) = (free_addr(), free_addr());
    let mesh_path = temp_path("mesh.yaml");
    let allow_web = "{from: [{service_account: web}]}";
    std::fs::write(&mesh_path, mesh(outbound.port(), inbound, allow_web)).unwrap();
    let (cp, secure, anchor) = control_plane_with_anchor(&mesh_path).await;

    let _api = api_sidecar(secure, &anchor, inbound, app.addr).await;
    let certs = Certs::start(secure, &anchor, WEB, "token-web")
        .written()
        .await;
    let envoy_admin = free_addr();
    let _envoy = Envoy::ads_mtls(
        "web-0",
        "web",
        (secure, envoy_admin),
        &certs.dir,
        CONTROL_PLANE,
        None,
    );

    // client → Envoy → mTLS → our proxy → app; the app learns the caller's proven identity.
    let client = TestClient::http1(outbound);
    let client_ref = &client;
    let reply = first_ok(&client, "Envoy reaches api").await;
    assert_eq!(reply.body, "api-app");
    assert_eq!(reply.header("x-echo-x-outrigger-client-id"), Some(WEB));

    // Every resource Envoy was sent it ACKed, secrets included.
    let status: serde_json::Value =
        serde_json::from_str(&get(cp.admin_addr, "/status").await.body).unwrap();
    let types = &status["nodes"]["web-0"]["types"];
    for t in [
        "Secret",
        "Cluster",
        "ClusterLoadAssignment",
        "Listener",
        "RouteConfiguration",
    ] {
        assert_eq!(types[t]["nacks"], 0, "{t}: {status}");
        assert_eq!(
            types[t]["acked_version"], types[t]["sent_version"],
            "{t}: {status}"
        );
    }
    let dump = get(envoy_admin, "/config_dump?include_eds").await.body;
    assert!(
        dump.contains(&format!("{}/cert.pem", certs.dir.display())),
        "{dump}"
    );
    assert!(dump.contains(API), "Envoy checks api's identity");

    // Under load, both certificates are renewed several times: no request is lost.
    renewals_under_load(&client, &certs, envoy_admin, WEB).await;

    // Envoy reports its load too (its bootstrap's `load_stats_config`): the edge shows, with
    // the identity Envoy proved.
    let edge = outrigger_tests::mesh_traffic::edge(cp.admin_addr, "web.shop", "api.shop").await;
    assert_eq!(edge["caller_identity"], WEB, "{edge}");
    assert!(
        edge["requests"].as_u64() > Some(0) && edge["success_rate"] == 1.0,
        "{edge}"
    );

    // The mesh lets only batch in now: Envoy's calls as web get 403 from our proxy.
    std::fs::write(
        &mesh_path,
        mesh(
            outbound.port(),
            inbound,
            "{from: [{service_account: batch}]}",
        ),
    )
    .unwrap();
    eventually("web is denied", Duration::from_secs(5), || async move {
        let r = client_ref.get("api.shop", "/hello").await.ok()?;
        (r.status == 403).then_some(())
    })
    .await;
}

/// The first 200 that `client` gets for `api.shop`, once the mesh lets it through.
async fn first_ok(client: &TestClient, what: &str) -> outrigger_tests::clients::Reply {
    eventually(what, Duration::from_secs(20), || async move {
        let r = client.get("api.shop", "/hello").await.ok()?;
        (r.status == 200).then_some(r)
    })
    .await
}

/// The serial numbers of the certificates for `id` that the Envoy at `admin` holds.
async fn envoys_serials(admin: SocketAddr, id: &str) -> Vec<String> {
    let certs: serde_json::Value = serde_json::from_str(&get(admin, "/certs").await.body).unwrap();
    let chains = certs["certificates"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    chains
        .iter()
        .flat_map(|c| c["cert_chain"].as_array().cloned().unwrap_or_default())
        .filter(|c| c.to_string().contains(id))
        .map(|c| c["serial_number"].to_string())
        .collect()
}

/// Seven seconds of requests through `client` while the certificates (`certs`, Envoy's
/// `id`, and our proxy's) are renewed every two seconds or so: none fails, and Envoy takes
/// the renewed files.
async fn renewals_under_load(
    client: &TestClient,
    certs: &Certs,
    envoy_admin: SocketAddr,
    id: &str,
) {
    let current = || std::fs::read_link(certs.dir.join("..data")).unwrap();
    let first = current();
    let serial_before = envoys_serials(envoy_admin, id).await;
    assert!(!serial_before.is_empty(), "Envoy shows {id}'s certificate");
    let (mut sent, mut failed, mut versions) = (0, Vec::new(), std::collections::BTreeSet::new());
    let until = std::time::Instant::now() + Duration::from_secs(7);
    while std::time::Instant::now() < until {
        let r = client.get("api.shop", "/hello").await;
        sent += 1;
        match r {
            Ok(r) if r.status == 200 => {}
            other => failed.push(format!("{:?}", other.map(|r| (r.status, r.body)))),
        }
        versions.insert(current());
    }
    assert!(
        failed.is_empty(),
        "{} of {sent} failed: {failed:?}",
        failed.len()
    );
    assert!(versions.len() >= 3, "renewed {} times", versions.len() - 1);
    assert_ne!(current(), first);
    assert!(sent > 100, "only {sent} requests");
    // Envoy took the renewed files (it watches the directory).
    eventually(
        "Envoy holds a renewed certificate",
        Duration::from_secs(5),
        || async {
            let now = envoys_serials(envoy_admin, id).await;
            (!now.is_empty() && now != serial_before).then_some(())
        },
    )
    .await;
}

/// A caller's sidecar of ours, running as `account`: its certificate from the CA, its routes
/// from the control plane.
async fn our_caller(secure: SocketAddr, anchor: &Path, account: &str) -> TestProxy {
    let id = format!("spiffe://cluster.local/ns/shop/sa/{account}");
    TestProxy::start(&format!(
        r#"admin: {{address: 127.0.0.1:0}}
identity:
  ca: {{address: "{secure}", token: token-{account}, id: "{id}", trust_anchor: "{anchor}", lifetime: {LIFETIME}}}
xds: {{address: "{secure}", node: {account}-0, service: {account}, identity: "{CONTROL_PLANE}"}}
listeners:
  - name: outbound
    address: 127.0.0.1:0
    direction: outbound
    rds: outbound
"#,
        anchor = anchor.display()
    ))
    .await
}

/// The reverse: our proxy as the caller's sidecar, an Envoy as the callee's, which takes its
/// inbound listener (mTLS only, the RBAC filter, the route to its app) from the control plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_caller_and_an_envoy_callee_share_one_mtls_mesh_set_by_the_control_plane() {
    // The app on 127.0.0.1:port; Envoy in front of it on 127.0.0.2:port, as a pod's
    // inbound capture would put it.
    let port = free_addr().port();
    let _app = upstreams::http_at("api-app", SocketAddr::from(([127, 0, 0, 1], port))).await;
    let envoy_inbound = SocketAddr::from(([127, 0, 0, 2], port));
    let mesh_path = temp_path("mesh.yaml");
    let text = mesh(
        free_addr().port(),
        envoy_inbound,
        "{from: [{service_account: web}]}",
    ) + "  - name: batch\n    namespace: shop\n    tokens: [{token: token-batch}]\n";
    std::fs::write(&mesh_path, text).unwrap();
    let (cp, secure, anchor) = control_plane_with_anchor(&mesh_path).await;

    let certs = Certs::start(secure, &anchor, API, "token-api")
        .written()
        .await;
    let envoy_admin = free_addr();
    let _envoy = Envoy::ads_mtls(
        "api-0",
        "api",
        (secure, envoy_admin),
        &certs.dir,
        CONTROL_PLANE,
        Some(envoy_inbound),
    );
    let web = our_caller(secure, &anchor, "web").await;
    let batch = our_caller(secure, &anchor, "batch").await;
    let web_client = TestClient::http1(web.addr("outbound"));
    let reply = first_ok(&web_client, "web reaches api through Envoy").await;
    assert_eq!(reply.body, "api-app");
    // Envoy hands the app the caller's proven identity.
    let xfcc = reply
        .header("x-echo-x-forwarded-client-cert")
        .unwrap_or_default();
    assert!(xfcc.contains(WEB), "{xfcc}");

    // batch is not allowed: Envoy's RBAC filter, from the mesh's rule, answers 403.
    let batch_client = TestClient::http1(batch.addr("outbound"));
    let batch_ref = &batch_client;
    // Once batch's sidecar has its routes (until then it knows no `api.shop`).
    let denied = eventually("batch is refused", Duration::from_secs(10), || async move {
        let r = batch_ref.get("api.shop", "/hello").await.ok()?;
        (r.status != 404).then_some(r)
    })
    .await;
    assert_eq!(denied.status, 403, "{}", denied.body);
    assert!(
        denied.body.contains("RBAC"),
        "Envoy refused it: {}",
        denied.body
    );

    // Under load, Envoy's certificate and ours are renewed several times: none is lost.
    renewals_under_load(&web_client, &certs, envoy_admin, API).await;

    // Every resource Envoy was sent it ACKed.
    let status: serde_json::Value =
        serde_json::from_str(&get(cp.admin_addr, "/status").await.body).unwrap();
    let types = &status["nodes"]["api-0"]["types"];
    for t in ["Secret", "Cluster", "Listener"] {
        assert_eq!(types[t]["nacks"], 0, "{t}: {status}");
        assert_eq!(
            types[t]["acked_version"], types[t]["sent_version"],
            "{t}: {status}"
        );
    }
}

fn python() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python")
}

fn grpc_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop/grpc_echo.py")
}

/// One unary call to `target` as the app with `bootstrap`: `{"code", "reply" | "details"}`.
async fn grpc_call(target: &str, bootstrap: &Path) -> serde_json::Value {
    let (target, bootstrap) = (target.to_string(), bootstrap.to_path_buf());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(grpc_script())
            .args(["xds-call", &target])
            .env("GRPC_XDS_BOOTSTRAP", bootstrap)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "the client said {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A proxyless gRPC server and its clients, configured by xDS alone: mTLS from certificate
/// providers (gRFC A29), the server's Listener (A36) with the mesh's RBAC rules (A41).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxyless_grpc_takes_mtls_and_authorization_from_the_control_plane() {
    let port = free_addr().port();
    let mesh_path = temp_path("mesh.yaml");
    let text = format!(
        r#"mesh: {{trust_domain: cluster.local}}
services:
  - name: api
    namespace: shop
    protocol: grpc
    tls_mode: strict
    endpoints: [{{address: "127.0.0.1:{port}"}}]
    tokens: [{{token: token-api}}]
    authorization: {{allow: [{{from: [{{service_account: web}}]}}]}}
  - name: web
    namespace: shop
    tokens: [{{token: token-web}}]
  - name: batch
    namespace: shop
    tokens: [{{token: token-batch}}]
"#
    );
    std::fs::write(&mesh_path, text).unwrap();
    let (cp, secure, anchor) = control_plane_with_anchor(&mesh_path).await;
    // Each app's certificate files and its gRPC bootstrap (ADS over mTLS with those files),
    // as the helper writes them.
    let bootstraps: Vec<PathBuf> = (0..3).map(|_| temp_path("grpc-bootstrap.json")).collect();
    let certs = ["api", "web", "batch"]
        .iter()
        .zip(&bootstraps)
        .map(|(a, bootstrap)| {
            let id = format!("spiffe://cluster.local/ns/shop/sa/{a}");
            let (address, node) = (secure.to_string(), format!("{a}-grpc"));
            let args = [
                "--grpc-bootstrap",
                bootstrap.to_str().unwrap(),
                "--xds-address",
                &address,
                "--node",
                &node,
                "--service",
                a,
            ];
            Certs::start_with(secure, &anchor, &id, &format!("token-{a}"), &args)
        })
        .collect::<Vec<_>>();
    let mut written = Vec::new();
    for c in certs {
        written.push(c.written().await);
    }
    let _certs = written;

    let server_bootstrap = &bootstraps[0];
    let mut server = Command::new(python())
        .arg(grpc_script())
        .args(["xds-server", &port.to_string()])
        .env("GRPC_XDS_BOOTSTRAP", server_bootstrap)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (web, batch) = (&bootstraps[1], &bootstraps[2]);

    let web_ref = web;
    let ok = eventually(
        "web's call succeeds",
        Duration::from_secs(30),
        || async move {
            let out = grpc_call("xds:///api.shop", web_ref).await;
            (out["code"] == "OK").then_some(out)
        },
    )
    .await;
    // The server saw the client's SPIFFE ID in the handshake.
    assert_eq!(
        ok["reply"]["x509_subject_alternative_name"][0], WEB,
        "the server saw {ok}"
    );
    assert_eq!(ok["reply"]["transport_security_type"][0], "tls");
    let denied = grpc_call("xds:///api.shop", batch).await;
    assert_eq!(denied["code"], "PERMISSION_DENIED", "{denied}");
    let plaintext = grpc_call(&format!("127.0.0.1:{port}"), batch).await;
    assert_eq!(plaintext["code"], "UNAVAILABLE", "{plaintext}");

    // A proxyless client reports its load too (its clusters say `lrs_server: self`): calls
    // for three seconds make its edge, under the identity its xDS connection proved.
    let (target, bootstrap) = ("xds:///api.shop".to_string(), web.clone());
    let calls = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .arg(grpc_script())
            .args(["xds-calls", &target, "3"])
            .env("GRPC_XDS_BOOTSTRAP", bootstrap)
            .output()
            .unwrap()
    });
    let edge = outrigger_tests::mesh_traffic::edge(cp.admin_addr, "web.shop", "api.shop").await;
    assert_eq!(edge["caller_identity"], WEB, "{edge}");
    assert!(edge["requests"].as_u64() > Some(0), "{edge}");
    let calls = calls.await.unwrap();
    assert!(
        calls.status.success(),
        "{}",
        String::from_utf8_lossy(&calls.stderr)
    );

    let status = cp.nodes.to_json();
    for node in ["api-grpc", "web-grpc", "batch-grpc"] {
        for (t, v) in status[node]["types"].as_object().unwrap() {
            assert_eq!(v["nacks"], 0, "{node} {t}: {status}");
        }
    }
    drop(server.stdin.take());
    let _ = server.kill();
    let _ = server.wait();
}
