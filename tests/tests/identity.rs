//! Workload certificates from the control plane's CA: the proxy makes its key, sends a CSR
//! with its bootstrap token, and serves mTLS with what comes back; certificates and roots
//! rotate under load without a failed request.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use outrigger_control_plane::app::{self, ControlPlane};
use outrigger_control_plane::ca::Ca;
use outrigger_core::sign_api::SignRequest;
use outrigger_proxy::identity::api;
use outrigger_tests::clients::{TestClient, get};
use outrigger_tests::fake_kube::FakeApiServer;
use outrigger_tests::{TestProxy, eventually, metric, strict_inbound, temp_path, upstreams};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};

const WEB: &str = "spiffe://mesh.test/ns/shop/sa/web";
const API: &str = "spiffe://mesh.test/ns/shop/sa/api";

const MESH: &str = r#"mesh: {trust_domain: mesh.test}
services:
  - name: api
    namespace: shop
    tokens: [{token: api-token}]
  - name: web
    namespace: shop
    tokens: [{token: web-token}, {token: old-token, expires: "2020-01-01T00:00:00Z"}]
"#;

async fn control_plane() -> ControlPlane {
    let path = temp_path("mesh.yaml");
    std::fs::write(&path, MESH).unwrap();
    app::start(app::Options {
        mesh_path: path,
        xds_address: "127.0.0.1:0".parse().unwrap(),
        admin_address: "127.0.0.1:0".parse().unwrap(),
        identity: app::IdentityOptions {
            secure_xds_address: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        },
        load_reports: Default::default(),
    })
    .await
    .unwrap()
}

/// The control plane's roots as a pod would have them mounted: one file per control plane,
/// rewritten with the CA's current bundle (as an operator updates it during a rotation).
fn write_anchor(cp: &ControlPlane) -> std::path::PathBuf {
    let port = cp.secure_xds_addr.unwrap().port();
    let path = std::env::temp_dir().join(format!(
        "outrigger-anchor-{}-{port}.pem",
        std::process::id()
    ));
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, cp.ca.load().bundle_pem()).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// A CA identity over TLS, checked against the control plane's roots.
fn identity(cp: &ControlPlane, token: &str, id: &str, lifetime: &str) -> String {
    identity_with_anchor(cp, token, id, lifetime, &write_anchor(cp))
}

fn identity_with_anchor(
    cp: &ControlPlane,
    token: &str,
    id: &str,
    lifetime: &str,
    anchor: &std::path::Path,
) -> String {
    format!(
        r#"identity:
  ca: {{address: "{}", token: {token}, id: "{id}", lifetime: {lifetime}, trust_anchor: "{}"}}
"#,
        cp.secure_xds_addr.unwrap(),
        anchor.display()
    )
}

async fn outbound(identity: &str, peer: SocketAddr) -> TestProxy {
    TestProxy::start(&format!(
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
clusters:
  - name: api
    tls: {{identities: ["{API}"]}}
    endpoints: [{{address: "{peer}"}}]
"#
    ))
    .await
}

async fn ready(proxy: &TestProxy) {
    let admin = proxy.admin();
    eventually(
        "the proxy has its certificate",
        Duration::from_secs(10),
        || async move { (get(admin, "/ready").await.status == 200).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_get_certificates_from_the_ca_and_talk_mtls() {
    let cp = control_plane().await;
    let app = upstreams::http("app").await;
    let b = strict_inbound(&identity(&cp, "api-token", API, "24h"), app.addr).await;
    let a = outbound(&identity(&cp, "web-token", WEB, "24h"), b.addr("inbound")).await;
    ready(&b).await;
    ready(&a).await;
    let r = TestClient::http1(a.addr("outbound"))
        .get("api", "/")
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("x-echo-x-outrigger-client-id"), Some(WEB));
    assert_eq!(cp.issued.load(Ordering::Relaxed), 2);
    let page = get(cp.admin_addr, "/metrics").await.body;
    assert!(
        page.contains("outrigger_cp_certificates_issued_total 2"),
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_signs_only_what_a_valid_token_proves() {
    let cp = control_plane().await;
    let endpoint = cp.xds_addr;
    let csr = |uri: &str| {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(uri.to_string().try_into().unwrap())];
        SignRequest {
            csr: params.serialize_request(&key).unwrap().der().to_vec(),
            lifetime_seconds: 0,
        }
    };
    let call = |token: &'static str, req: SignRequest| async move {
        api::sign(endpoint, None, token, req, Duration::from_secs(5)).await
    };
    assert!(call("web-token", csr(WEB)).await.is_ok());

    let wrong = call("web-token", csr(API)).await.unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::PermissionDenied);
    assert_eq!(
        wrong.message(),
        format!("the CSR asks for {API}, but the credential proves {WEB}")
    );
    let forged = call("made-up", csr(WEB)).await.unwrap_err();
    assert_eq!(forged.code(), tonic::Code::Unauthenticated);
    assert_eq!(forged.message(), "unknown bootstrap token");
    let expired = call("old-token", csr(WEB)).await.unwrap_err();
    assert_eq!(expired.message(), "the bootstrap token has expired");

    // A proxy with a token that proves nothing never becomes ready.
    let app = upstreams::http("app").await;
    let stuck = strict_inbound(&identity(&cp, "made-up", API, "24h"), app.addr).await;
    let admin = stuck.admin();
    // Its CSR has been answered (and refused): the readiness page says so.
    let ready = eventually(
        "the refused CSR shows on /ready",
        Duration::from_secs(10),
        || async move {
            let r = get(admin, "/ready").await;
            r.body.contains("unknown bootstrap token").then_some(r)
        },
    )
    .await;
    assert_eq!(ready.status, 503, "{}", ready.body);
}

/// A copy of `ca` that also trusts `also`'s root.
fn trusting(ca: &Ca, also: &Ca) -> Ca {
    let dir = temp_path("ca");
    ca.save(&dir).unwrap();
    let mut copy = Ca::load(&dir, "mesh.test").unwrap();
    copy.trust_also(also.cert_pem());
    copy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_and_the_root_rotate_under_load_without_a_failed_request() {
    let cp = control_plane().await;
    let app = upstreams::http("app").await;
    // Two-second certificates: each proxy renews about every second.
    let b = strict_inbound(&identity(&cp, "api-token", API, "2s"), app.addr).await;
    let a = outbound(&identity(&cp, "web-token", WEB, "2s"), b.addr("inbound")).await;
    ready(&b).await;
    ready(&a).await;

    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (sent, failed, stop) = (sent.clone(), failed.clone(), stop.clone());
        let client = TestClient::http1(a.addr("outbound"));
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let ok = matches!(client.get("api", "/").await, Ok(r) if r.status == 200);
                sent.fetch_add(1, Ordering::Relaxed);
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    // A new caller now and then makes a fresh handshake against whatever B holds.
    let fresh_caller = || async {
        let c = outbound(&identity(&cp, "web-token", WEB, "2s"), b.addr("inbound")).await;
        ready(&c).await;
        let r = TestClient::http1(c.addr("outbound")).get("api", "/").await;
        assert_eq!(r.map(|r| r.status.as_u16()).ok(), Some(200));
    };
    let renewals = |n: u64| {
        let issued = cp.issued.clone();
        let target = issued.load(Ordering::Relaxed) + n;
        async move {
            eventually("renewals", Duration::from_secs(15), || {
                let issued = issued.clone();
                async move { (issued.load(Ordering::Relaxed) >= target).then_some(()) }
            })
            .await
        }
    };

    renewals(4).await;
    fresh_caller().await;
    // Root rotation: first everyone trusts both roots, then the new root signs.
    let old = cp.ca.load_full();
    let next = Ca::generate("mesh.test").unwrap();
    cp.ca.store(Arc::new(trusting(&old, &next)));
    write_anchor(&cp);
    renewals(4).await;
    fresh_caller().await;
    cp.ca.store(Arc::new(trusting(&next, &old)));
    renewals(4).await;
    fresh_caller().await;

    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!(
        "{sent} requests across {} certificates and one root rotation, {failed} failed",
        cp.issued.load(Ordering::Relaxed)
    );
    assert!(sent > 100);
    assert_eq!(failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mtls_xds_a_node_gets_the_config_of_the_identity_it_proves() {
    let (api_app, secret_app) = (
        upstreams::http("api").await,
        upstreams::http("secret").await,
    );
    let mesh = format!(
        r#"mesh: {{trust_domain: mesh.test}}
services:
  - name: web
    namespace: shop
    calls: [api]
    tokens: [{{token: web-token}}]
  - name: api
    namespace: shop
    endpoints: [{{address: "{}"}}]
  - name: secret
    namespace: shop
    endpoints: [{{address: "{}"}}]
"#,
        api_app.addr, secret_app.addr
    );
    let path = temp_path("mesh.yaml");
    std::fs::write(&path, mesh).unwrap();
    let cp = app::start(app::Options {
        mesh_path: path,
        xds_address: "127.0.0.1:0".parse().unwrap(),
        admin_address: "127.0.0.1:0".parse().unwrap(),
        identity: app::IdentityOptions {
            secure_xds_address: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        },
        load_reports: Default::default(),
    })
    .await
    .unwrap();
    let secure = cp.secure_xds_addr.unwrap();
    // The node claims to be `secret` (which may call anything); its certificate says `web`.
    let proxy = TestProxy::start(&format!(
        "{}{}",
        identity(&cp, "web-token", WEB, "24h"),
        outrigger_tests::xds_config(&format!(
            "address: \"{secure}\"\nnode: liar\nservice: secret\n\
             identity: \"spiffe://mesh.test/ns/outrigger/sa/control-plane\""
        ))
    ))
    .await;
    ready(&proxy).await;
    let client = TestClient::http1(proxy.addr("outbound"));
    let r = client.get("api", "/").await.unwrap();
    assert_eq!((r.status.as_u16(), r.body.as_str()), (200, "api"));
    let r = client.get("secret", "/").await.unwrap();
    assert_eq!(r.status, 404, "web may not call secret: {r:?}");
    // The control plane counts its pushes and how long each took to be ACKed (the last ACK
    // may still be on its way when the proxy is ready).
    eventually(
        "three pushes, each ACKed",
        Duration::from_secs(10),
        || async {
            let page = get(cp.admin_addr, "/metrics").await.body;
            (metric(&page, "outrigger_cp_pushes_total") >= 3
                && metric(&page, "outrigger_cp_push_ack_seconds_count") >= 3)
                .then_some(())
        },
    )
    .await;

    // Without a certificate from our CA, there is no xDS at all.
    let foreign = Ca::generate("mesh.test").unwrap();
    let outsider = file_identity_proxy(&cp, &foreign, WEB, "outsider").await;
    // Our own CA's certificate, but for another trust domain: not one of the mesh's nodes.
    let other_td = "spiffe://other.test/ns/shop/sa/web";
    let stranger = file_identity_proxy(&cp, &cp.ca.load(), other_td, "stranger").await;
    // Each has tried and been turned away at least once: its ADS stream failed.
    for proxy in [&outsider, &stranger] {
        let admin = proxy.admin();
        eventually(
            "the refused ADS stream is counted",
            Duration::from_secs(10),
            || async move {
                let page = get(admin, "/metrics").await.body;
                (metric(&page, "outrigger_xds_reconnects_total") >= 1).then_some(())
            },
        )
        .await;
    }
    for (who, proxy) in [
        ("a foreign CA's", &outsider),
        ("another trust domain's", &stranger),
    ] {
        let ready = get(proxy.admin(), "/ready").await.status;
        assert_eq!(ready, 503, "{who} certificate got config");
    }
    let status = get(cp.admin_addr, "/status").await.body;
    assert!(
        !status.contains("outsider") && !status.contains("stranger"),
        "{status}"
    );
}

/// A proxy dialling `cp`'s secure xDS as node `node`, with a certificate for `id` from `ca`
/// (trusting the control plane's roots).
async fn file_identity_proxy(cp: &ControlPlane, ca: &Ca, id: &str, node: &str) -> TestProxy {
    let files = temp_path(node);
    std::fs::create_dir_all(&files).unwrap();
    let (chain, key) = ca
        .issue(
            &outrigger_core::spiffe::SpiffeId::parse(id).unwrap(),
            Duration::from_secs(3600),
        )
        .unwrap();
    for (name, text) in [
        ("cert.pem", chain),
        ("key.pem", key),
        ("bundle.pem", cp.ca.load().bundle_pem().to_string()),
    ] {
        std::fs::write(files.join(name), text).unwrap();
    }
    TestProxy::start(&format!(
        "identity:\n  cert: {0}/cert.pem\n  key: {0}/key.pem\n  bundle: {0}/bundle.pem\n{1}",
        files.display(),
        outrigger_tests::xds_config(&format!(
            "address: \"{}\"\nnode: {node}\n\
             identity: \"spiffe://mesh.test/ns/outrigger/sa/control-plane\"",
            cp.secure_xds_addr.unwrap()
        ))
    ))
    .await
}

/// A Kubernetes API server that knows three tokens, over real TLS, answering TokenReview.
async fn fake_api_server() -> FakeApiServer {
    FakeApiServer::start(
        "cp-token",
        Arc::new(|_method: &str, _path: &str, body: serde_json::Value| {
            let status = match body["spec"]["token"].as_str().unwrap_or_default() {
                "sa-token-web" => {
                    serde_json::json!({"authenticated": true, "audiences": ["outrigger"], "user": {"username": "system:serviceaccount:shop:web"}})
                }
                // Authenticated, but without saying for which audiences: an API server that
                // did not check ours.
                "sa-token-no-audience" => {
                    serde_json::json!({"authenticated": true, "user": {"username": "system:serviceaccount:shop:web"}})
                }
                "node-token" => {
                    serde_json::json!({"authenticated": true, "audiences": ["outrigger"], "user": {"username": "system:node:worker-1"}})
                }
                _ => {
                    serde_json::json!({"authenticated": false, "error": "token has expired"})
                }
            };
            (200, serde_json::json!({"kind": "TokenReview", "status": status}))
        }),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_kubernetes_a_service_account_token_is_checked_with_a_token_review() {
    use outrigger_control_plane::token_review::TokenReviewer;
    let api = fake_api_server().await;
    let reviewer = TokenReviewer::new(api.client().client);
    let path = temp_path("mesh.yaml");
    std::fs::write(&path, MESH).unwrap();
    let cp = app::start(app::Options {
        mesh_path: path,
        xds_address: "127.0.0.1:0".parse().unwrap(),
        admin_address: "127.0.0.1:0".parse().unwrap(),
        identity: app::IdentityOptions {
            token_review: Some(Arc::new(reviewer)),
            ..Default::default()
        },
        load_reports: Default::default(),
    })
    .await
    .unwrap();
    let endpoint = cp.xds_addr;
    let call = |token: &'static str, uri: &'static str| async move {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(uri.to_string().try_into().unwrap())];
        let req = SignRequest {
            csr: params.serialize_request(&key).unwrap().der().to_vec(),
            lifetime_seconds: 0,
        };
        api::sign(endpoint, None, token, req, Duration::from_secs(5)).await
    };
    assert!(call("sa-token-web", WEB).await.is_ok());
    let wrong = call("sa-token-web", API).await.unwrap_err();
    assert_eq!(wrong.code(), tonic::Code::PermissionDenied);
    let expired = call("sa-token-old", WEB).await.unwrap_err();
    assert_eq!(
        expired.message(),
        "the API server refused the token: token has expired"
    );
    let node = call("node-token", WEB).await.unwrap_err();
    assert_eq!(
        node.message(),
        "`system:node:worker-1` is not a service account"
    );
    let unchecked = call("sa-token-no-audience", WEB).await.unwrap_err();
    assert_eq!(
        unchecked.message(),
        "the token is not for audience `outrigger`"
    );
    // A caller making up tokens runs into its own limit, without a review each.
    let mut limited = 0;
    for _ in 0..15 {
        let made_up: &'static str =
            Box::leak(format!("made-up-{}", fastrand::u64(..)).into_boxed_str());
        let e = call(made_up, WEB).await.unwrap_err();
        limited += usize::from(
            e.message()
                .contains("too many token reviews from this address"),
        );
    }
    assert!(limited >= 5, "{limited} of 15 made-up tokens were limited");
    // Tokens from the mesh file still work beside it.
    assert!(call("web-token", WEB).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_cannot_prove_itself_against_the_anchor_gets_no_csr() {
    let cp = control_plane().await;
    let app = upstreams::http("app").await;
    // An impostor's root in the anchor file: the real control plane cannot prove itself.
    let impostor = Ca::generate("mesh.test").unwrap();
    let anchor = temp_path("impostor-anchor.pem");
    std::fs::write(&anchor, impostor.bundle_pem()).unwrap();
    let misled = strict_inbound(
        &identity_with_anchor(&cp, "api-token", API, "24h", &anchor),
        app.addr,
    )
    .await;
    let admin = misled.admin();
    let why = eventually(
        "the misled proxy reports why it has no certificate",
        Duration::from_secs(10),
        || async move {
            let r = get(admin, "/ready").await;
            (r.status == 503 && r.body.contains("no valid certificate")).then_some(r.body)
        },
    )
    .await;
    assert!(why.contains("invalid peer certificate"), "{why}");
    // The good one beside it gets its certificate, so the CA was up all along.
    let good = strict_inbound(&identity(&cp, "web-token", WEB, "24h"), app.addr).await;
    ready(&good).await;
    assert_eq!(
        cp.issued.load(Ordering::Relaxed),
        1,
        "the CSR (and its token) reached a CA the anchor does not vouch for"
    );
}

#[test]
fn what_the_ca_returns_is_checked_before_it_is_installed() {
    use outrigger_core::spiffe::SpiffeId;
    use outrigger_proxy::identity::client::check_issued;
    use outrigger_proxy::identity::store::IdentityStore;
    let ca = Ca::generate("mesh.test").unwrap();
    let anchor = IdentityStore::default();
    anchor.set_bundle(ca.bundle_pem().as_bytes()).unwrap();
    let web = SpiffeId::parse(WEB).unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(WEB.to_string().try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap().der().to_vec();
    let good = ca.sign_csr(&csr, &web, Duration::from_secs(3600)).unwrap();
    check_issued(&good, &web, &key, Some(&anchor)).unwrap();

    let other_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let e = check_issued(&good, &web, &other_key, Some(&anchor))
        .unwrap_err()
        .to_string();
    assert_eq!(e, "the certificate is not for this proxy's key");

    let (for_api, _) = ca
        .issue(&SpiffeId::parse(API).unwrap(), Duration::from_secs(3600))
        .unwrap();
    let e = check_issued(&for_api, &web, &key, Some(&anchor))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!("the certificate is for {API}, not the requested {WEB}")
    );

    let foreign = Ca::generate("mesh.test").unwrap();
    let elsewhere = foreign
        .sign_csr(&csr, &web, Duration::from_secs(3600))
        .unwrap();
    let e = check_issued(&elsewhere, &web, &key, Some(&anchor))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("the chain does not reach the trust anchor"),
        "{e}"
    );

    let now = time::OffsetDateTime::now_utc();
    let (expired, _) = ca
        .issue_between(
            &web,
            now - time::Duration::days(2),
            now - time::Duration::days(1),
        )
        .unwrap();
    let e = check_issued(&expired, &web, &key, Some(&anchor))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("the certificate is not valid now"), "{e}");
}

/// Even where the CA is reached in plaintext (local development), an answer is checked: a CA
/// (or whoever answers in its place) that returns a certificate for another identity, or for
/// another key, is not believed, and the proxy says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_answers_for_another_identity_is_not_believed() {
    use outrigger_core::sign_api::SignResponse;
    use outrigger_core::spiffe::SpiffeId;
    use prost::Message;
    let ca = Ca::generate("mesh.test").unwrap();
    let (other_chain, _) = ca
        .issue(&SpiffeId::parse(API).unwrap(), Duration::from_secs(3600))
        .unwrap();
    let (own_id_other_key, _) = ca
        .issue(&SpiffeId::parse(WEB).unwrap(), Duration::from_secs(3600))
        .unwrap();
    for (lie, why) in [
        (
            other_chain,
            format!("the certificate is for {API}, not the requested {WEB}"),
        ),
        (
            own_id_other_key,
            "the certificate is not for this proxy's key".to_string(),
        ),
    ] {
        let answer = SignResponse {
            chain_pem: lie,
            bundle_pem: ca.bundle_pem().to_string(),
        };
        let liar = upstreams::grpc_canned(answer.encode_to_vec().into()).await;
        let app = upstreams::http("app").await;
        let proxy = strict_inbound(
            &format!(
                r#"identity:
  ca: {{address: "{}", token: t, id: "{WEB}", plaintext: true}}
"#,
                liar.addr
            ),
            app.addr,
        )
        .await;
        let admin = proxy.admin();
        let body = eventually(
            "the proxy says why",
            Duration::from_secs(10),
            || async move {
                let r = get(admin, "/ready").await;
                (r.status == 503 && r.body.contains("rejected")).then_some(r.body)
            },
        )
        .await;
        assert!(body.contains(&why), "{body}");
    }
}
