//! The ways around the mesh's promises that a caller or an upstream might try, each over
//! real sockets: plaintext that skips authorization, headers that impersonate the proxy,
//! requests that mean one thing to the proxy and another to the app, and upstream answers
//! that would crash the proxy or grow its metrics without bound.

use std::net::SocketAddr;
use std::time::Duration;

use outrigger_control_plane::ca::{Ca, DEFAULT_LIFETIME};
use outrigger_core::spiffe::SpiffeId;
use outrigger_tests::clients::{TestClient, get, raw_exchange};
use outrigger_tests::{TestProxy, identity_yaml, metric, upstreams, write_identity};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WEB: &str = "spiffe://mesh.test/ns/shop/sa/web";
const API: &str = "spiffe://mesh.test/ns/shop/sa/api";

/// An inbound listener in permissive mode whose opaque TCP goes to `tcp_to`, with `extra`
/// lines (authorization, say) under the listener.
async fn permissive(tcp_to: SocketAddr, extra: &str) -> TestProxy {
    let ca = Ca::generate("mesh.test").unwrap();
    let (chain, key) = ca
        .issue(&SpiffeId::parse(API).unwrap(), DEFAULT_LIFETIME)
        .unwrap();
    let identity = identity_yaml(&write_identity(&chain, &key, ca.bundle_pem()));
    TestProxy::start(&format!(
        r#"{identity}admin:
  address: 127.0.0.1:0
listeners:
  - name: inbound
    address: 127.0.0.1:0
    direction: inbound
    detect_timeout: 300ms
    tls: {{mode: permissive}}
{extra}    tcp: {{cluster: app}}
clusters:
  - name: app
    endpoints: [{{address: "{tcp_to}"}}]
"#
    ))
    .await
}

/// One plain HTTP listener routing everything to `upstream`, with `route_extra` on its route.
async fn plain(upstream: SocketAddr, route_extra: &str) -> TestProxy {
    TestProxy::start(&format!(
        r#"admin:
  address: 127.0.0.1:0
listeners:
  - name: inbound
    address: 127.0.0.1:0
    direction: inbound
    virtual_hosts:
      - name: app
        domains: ['*']
        routes:
          - backends: [{{cluster: app}}]
{route_extra}clusters:
  - name: app
    endpoints: [{{address: "{upstream}"}}]
"#
    ))
    .await
}

/// Connects and reads until the proxy closes, without sending anything.
async fn silent_caller_is_closed(addr: SocketAddr) -> bool {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut buf))
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_opaque_bytes_are_judged_by_authorization_in_permissive_mode() {
    let echo = upstreams::tcp_echo().await;
    let deny = format!("    authorization: {{default: deny, allow: [\"{WEB}\"]}}\n");
    let proxy = permissive(echo.addr, &deny).await;
    let addr = proxy.addr("inbound");
    // A request that starts with CRLF, and bytes that are no protocol at all: both are opaque
    // to detection, and neither proves an identity.
    let crlf = raw_exchange(addr, b"\r\nGET / HTTP/1.1\r\nHost: app\r\n\r\n").await;
    assert_eq!(crlf, "", "an unauthenticated opaque caller reached the app");
    let binary = raw_exchange(addr, b"\x00\x01\x02 not a protocol").await;
    assert_eq!(binary, "");
    // A caller that says nothing until detection gives up is opaque too, and closed.
    assert!(
        silent_caller_is_closed(addr).await,
        "a silent caller was kept open"
    );
    let page = get(proxy.admin(), "/metrics").await.body;
    assert_eq!(
        metric(
            &page,
            "outrigger_authorization_denied_total{listener=\"inbound\",peer=\"none\"}"
        ),
        3,
        "{page}"
    );

    // Where plaintext callers are allowed, opaque TCP still flows.
    let open = permissive(echo.addr, "").await;
    let mut conn = tokio::net::TcpStream::connect(open.addr("inbound"))
        .await
        .unwrap();
    conn.write_all(b"\x00\x01 echo me").await.unwrap();
    conn.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut back))
        .await
        .expect("the echo ends")
        .unwrap();
    assert_eq!(back, b"\x00\x01 echo me");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vouched_headers_are_stripped_in_every_spelling_on_every_listener() {
    let app = upstreams::http("app").await;
    let proxy = plain(app.addr, "").await;
    let claim = "spiffe://mesh.test/ns/shop/sa/admin";
    for name in [
        "x-outrigger-client-id",
        "X-Outrigger-Client-Id",
        "x_outrigger_client_id",
        "x-outrigger_client-id",
    ] {
        let r = TestClient::http1(proxy.addr("inbound"))
            .send(http::Method::GET, "app", "/", &[(name, claim)], "")
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let echoed: Vec<_> = r
            .headers
            .keys()
            .filter(|k| k.as_str().contains("outrigger") && k.as_str().contains("client"))
            .collect();
        assert!(echoed.is_empty(), "{name} reached the app as {echoed:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_retry_after_is_clamped_and_answered() {
    let (up, heads) = upstreams::canned(
        "HTTP/1.1 503 Service Unavailable\r\nretry-after: 18446744073709551615\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    let retry = "            retry: {attempts: 2, on: [gateway-error]}\n";
    let proxy = plain(up.addr, retry).await;
    let r = TestClient::http1(proxy.addr("inbound"))
        .get("app", "/")
        .await
        .expect("an answer, not a dropped connection");
    // Longer than any route's time left: the upstream's own answer goes back at once.
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("retry-after"), Some("18446744073709551615"));
    assert_eq!(heads.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_grpc_status_becomes_a_bounded_label() {
    let (up, _) = upstreams::canned(
        "HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ngrpc-status: made-up-label-value\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    let proxy = plain(up.addr, "").await;
    let r = TestClient::http1(proxy.addr("inbound"))
        .get("app", "/")
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    let page = get(proxy.admin(), "/metrics").await.body;
    assert!(!page.contains("made-up-label-value"), "{page}");
    assert!(page.contains("grpc_status=\"other\""), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_and_authority_that_disagree_are_rejected() {
    let app = upstreams::http("app").await;
    let proxy = plain(app.addr, "").await;
    let addr = proxy.addr("inbound");
    let mixed = raw_exchange(
        addr,
        b"GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(mixed.starts_with("HTTP/1.1 400"), "{mixed}");
    assert!(!mixed.contains("x-upstream"), "the app saw it: {mixed}");
    // Agreeing ones (any case) are fine.
    let same = raw_exchange(
        addr,
        b"GET http://a.example/ HTTP/1.1\r\nHost: A.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(same.starts_with("HTTP/1.1 200"), "{same}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_is_never_passed_to_the_app() {
    let (up, heads) = upstreams::canned("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let proxy = plain(up.addr, "").await;
    let r = raw_exchange(
        proxy.addr("inbound"),
        b"GET / HTTP/1.1\r\nHost: app\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let seen = heads.lock().unwrap().join("---\n").to_ascii_lowercase();
    assert!(
        !seen.contains("upgrade"),
        "the app was offered an upgrade: {seen}"
    );
    assert!(!seen.contains("http2-settings"), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_upgrades_a_route_allows_are_passed_on() {
    let ask = b"GET / HTTP/1.1\r\nHost: app\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    for (route_extra, passed) in [("", true), ("            upgrades: []\n", false)] {
        let (up, heads) = upstreams::canned("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        let proxy = plain(up.addr, route_extra).await;
        let r = raw_exchange(proxy.addr("inbound"), ask).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        let seen = heads.lock().unwrap().join("").to_ascii_lowercase();
        assert_eq!(
            seen.contains("upgrade: websocket"),
            passed,
            "{route_extra:?}: {seen}"
        );
    }
    // h2c cannot even be asked for.
    let err = outrigger_proxy::config::snapshot::RuntimeConfig::build(
        "upgrades.yaml",
        r#"listeners:
  - name: l
    address: 127.0.0.1:0
    direction: inbound
    virtual_hosts:
      - name: v
        domains: ['*']
        routes:
          - backends: [{cluster: c}]
            upgrades: [h2c]
clusters:
  - name: c
    endpoints: [{address: "127.0.0.1:9"}]
"#,
        1,
        None,
    )
    .err()
    .expect("h2c is refused");
    assert!(err.to_string().contains("never honoured"), "{err}");
}
