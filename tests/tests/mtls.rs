//! Mutual TLS between two of our proxies over real sockets, with certificates from the
//! mesh's CA: app → outbound proxy A → mTLS (HTTP/2) → inbound proxy B → app.

use std::net::SocketAddr;

use outrigger_control_plane::ca::{Ca, DEFAULT_LIFETIME};
use outrigger_core::spiffe::SpiffeId;
use outrigger_tests::clients::{TestClient, get};
use outrigger_tests::{
    STRICT, TestProxy, eventually, identity_yaml, inbound, metric, upstreams, write_identity,
};

const WEB: &str = "spiffe://mesh.test/ns/shop/sa/web";
const API: &str = "spiffe://mesh.test/ns/shop/sa/api";

/// Writes an identity's files and returns the `identity:` block that names them.
fn identity(bundle_from: &Ca, chain_and_key: (String, String)) -> String {
    let (chain, key) = chain_and_key;
    identity_yaml(&write_identity(&chain, &key, bundle_from.bundle_pem()))
}

fn issue(ca: &Ca, id: &str) -> (String, String) {
    ca.issue(&SpiffeId::parse(id).unwrap(), DEFAULT_LIFETIME)
        .unwrap()
}

/// Proxy A: an outbound listener whose cluster is proxy B, over mTLS.
async fn outbound(identity: &str, peer: SocketAddr, expect: &str) -> TestProxy {
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
    tls: {{identities: ["{expect}"]}}
    endpoints: [{{address: "{peer}"}}]
"#
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mtls_hop_carries_the_callers_identity() {
    let ca = Ca::generate("mesh.test").unwrap();
    let app = upstreams::http("app").await;
    let b = inbound(&identity(&ca, issue(&ca, API)), app.addr, STRICT).await;
    let a = outbound(&identity(&ca, issue(&ca, WEB)), b.addr("inbound"), API).await;
    let client = TestClient::http1(a.addr("outbound"));
    for _ in 0..3 {
        let r = client.get("api", "/").await.unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-echo-x-outrigger-client-id"), Some(WEB));
    }
    // HTTP/1 from the app rode one HTTP/2 connection between the proxies.
    let page = get(b.admin(), "/metrics").await.body;
    assert_eq!(
        metric(
            &page,
            "outrigger_connections_total{listener=\"inbound\",protocol=\"tls\"}"
        ),
        1,
        "{page}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wrong_identity_for_the_destination_is_refused() {
    let ca = Ca::generate("mesh.test").unwrap();
    let app = upstreams::http("app").await;
    let b = inbound(&identity(&ca, issue(&ca, API)), app.addr, STRICT).await;
    let other = "spiffe://mesh.test/ns/shop/sa/billing";
    let a = outbound(&identity(&ca, issue(&ca, WEB)), b.addr("inbound"), other).await;
    let r = TestClient::http1(a.addr("outbound"))
        .get("api", "/")
        .await
        .unwrap();
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("x-outrigger-error"), Some("connect-failed"));
    assert!(
        r.body.contains(&format!("peer is {API}, expected {other}")),
        "{}",
        r.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_from_another_ca_or_expired_are_refused() {
    let ca = Ca::generate("mesh.test").unwrap();
    let foreign = Ca::generate("mesh.test").unwrap();
    let app = upstreams::http("app").await;
    let b = inbound(&identity(&ca, issue(&ca, API)), app.addr, STRICT).await;
    let now = time::OffsetDateTime::now_utc();
    let expired = ca
        .issue_between(
            &SpiffeId::parse(WEB).unwrap(),
            now - time::Duration::days(2),
            now - time::Duration::days(1),
        )
        .unwrap();
    // Each caller trusts B's CA, so only B's judgement of the caller is tested.
    let callers = [("another CA", issue(&foreign, WEB)), ("expired", expired)];
    let handshake_failures = || async {
        let page = get(b.admin(), "/metrics").await.body;
        metric(
            &page,
            "outrigger_tls_handshake_failures_total{listener=\"inbound\"}",
        )
    };
    for (what, cert) in callers {
        let before = handshake_failures().await;
        let a = outbound(&identity(&ca, cert), b.addr("inbound"), API).await;
        let r = TestClient::http1(a.addr("outbound")).get("api", "/").await;
        // With TLS 1.3 the server judges the client's certificate after the client thinks the
        // handshake is done, so the caller sees the connection fail (502) or never open (503).
        assert!(
            r.as_ref()
                .map_or(true, |r| [502, 503].contains(&r.status.as_u16())),
            "{what}: {r:?}"
        );
        // The server may record its refusal just after the client has seen the failure (and a
        // retried connect may add more).
        eventually(
            &format!("{what}: B counts the refused handshake"),
            std::time::Duration::from_secs(5),
            || async { (handshake_failures().await > before).then_some(()) },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_is_refused_in_strict_mode_and_accepted_in_permissive_mode() {
    let ca = Ca::generate("mesh.test").unwrap();
    let app = upstreams::http("app").await;
    let strict = inbound(&identity(&ca, issue(&ca, API)), app.addr, STRICT).await;
    let r = TestClient::http1(strict.addr("inbound"))
        .get("api", "/")
        .await;
    assert!(r.is_err(), "strict mode answered plaintext: {r:?}");
    let page = get(strict.admin(), "/metrics").await.body;
    assert_eq!(
        metric(
            &page,
            "outrigger_plaintext_refused_total{listener=\"inbound\"}"
        ),
        1
    );

    let permissive = inbound(
        &identity(&ca, issue(&ca, API)),
        app.addr,
        "    tls: {mode: permissive}\n",
    )
    .await;
    let r = TestClient::http1(permissive.addr("inbound"))
        .send(
            http::Method::GET,
            "api",
            "/",
            &[(
                "x-outrigger-client-id",
                "spiffe://mesh.test/ns/shop/sa/admin",
            )],
            "",
        )
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-echo-x-outrigger-client-id"),
        None,
        "a plaintext caller cannot claim an identity"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_denies_an_identity_it_does_not_list() {
    let ca = Ca::generate("mesh.test").unwrap();
    let app = upstreams::http("app").await;
    let b = inbound(
        &identity(&ca, issue(&ca, API)),
        app.addr,
        r#"    tls: {mode: strict}
    authorization: {default: deny, allow: ["spiffe://mesh.test/ns/pay/*"]}
"#,
    )
    .await;
    let a = outbound(&identity(&ca, issue(&ca, WEB)), b.addr("inbound"), API).await;
    let r = TestClient::http1(a.addr("outbound"))
        .get("api", "/")
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.header("x-outrigger-error"), Some("denied"));
    let page = get(b.admin(), "/metrics").await.body;
    assert_eq!(
        metric(
            &page,
            &format!("outrigger_authorization_denied_total{{listener=\"inbound\",peer=\"{WEB}\"}}")
        ),
        1,
        "{page}"
    );

    // Listed by namespace, a caller from `pay` gets through.
    let payer = "spiffe://mesh.test/ns/pay/sa/checkout";
    let p = outbound(&identity(&ca, issue(&ca, payer)), b.addr("inbound"), API).await;
    let r = TestClient::http1(p.addr("outbound"))
        .get("api", "/")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-echo-x-outrigger-client-id"), Some(payer));
}

/// A's opaque listener sends TCP to B over mTLS; B hands it to an echo server if the
/// caller is allowed. Returns what came back for `message`.
async fn tcp_through(ca: &Ca, caller: &str, b_inbound: SocketAddr, message: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = TestProxy::start(&format!(
        r#"{}listeners:
  - name: outbound
    address: 127.0.0.1:0
    direction: outbound
    protocol: opaque
    tcp: {{cluster: peer}}
clusters:
  - name: peer
    tls: {{identities: ["{API}"]}}
    endpoints: [{{address: "{b_inbound}"}}]
"#,
        identity(ca, issue(ca, caller))
    ))
    .await;
    let mut conn = tokio::net::TcpStream::connect(a.addr("outbound"))
        .await
        .unwrap();
    conn.write_all(message).await.unwrap();
    conn.shutdown().await.unwrap();
    let mut back = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        conn.read_to_end(&mut back),
    )
    .await
    .expect("the connection ends");
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_rides_mtls_and_a_denied_caller_is_closed() {
    let ca = Ca::generate("mesh.test").unwrap();
    let echo = upstreams::tcp_echo().await;
    let b = TestProxy::start(&format!(
        r#"{}admin:
  address: 127.0.0.1:0
listeners:
  - name: inbound
    address: 127.0.0.1:0
    direction: inbound
    tls: {{mode: strict}}
    authorization: {{allow: ["{WEB}"]}}
    tcp: {{cluster: echo}}
clusters:
  - name: echo
    endpoints: [{{address: "{}"}}]
"#,
        identity(&ca, issue(&ca, API)),
        echo.addr
    ))
    .await;
    let back = tcp_through(&ca, WEB, b.addr("inbound"), b"over mTLS").await;
    assert_eq!(back, b"over mTLS");

    let stranger = "spiffe://mesh.test/ns/shop/sa/stranger";
    let back = tcp_through(&ca, stranger, b.addr("inbound"), b"let me in").await;
    assert!(back.is_empty(), "a denied caller got {back:?}");
    let page = get(b.admin(), "/metrics").await.body;
    assert_eq!(
        metric(
            &page,
            &format!(
                "outrigger_authorization_denied_total{{listener=\"inbound\",peer=\"{stranger}\"}}"
            )
        ),
        1,
        "{page}"
    );
}
