//! A quiet HTTP/1 keep-alive connection gives back its buffers and rests (see
//! `proxy/src/listener/rest.rs`): over real sockets, plaintext and mTLS, it still serves its
//! next request, a request head cut short by the rest is not lost, and a request body still
//! on its way is never taken for a new request.

use std::sync::Arc;
use std::time::Duration;

use outrigger_control_plane::ca::{Ca, DEFAULT_LIFETIME};
use outrigger_core::spiffe::SpiffeId;
use outrigger_proxy::identity::mtls;
use outrigger_proxy::identity::store::IdentityStore;
use outrigger_proxy::listener::rest::rested_connections;
use outrigger_tests::clients::get;
use outrigger_tests::{
    TestProxy, cluster, config, eventually, identity_yaml, metric, strict_inbound, upstreams,
    write_identity,
};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const VHOSTS: &str = r#"- name: app
  domains: ['*']
  routes:
    - backends: [{cluster: app}]
"#;

/// Reads one response with a `Content-Length` body; its head and body as text.
async fn response(conn: &mut (impl AsyncRead + Unpin)) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut chunk))
            .await
            .expect("a response within the deadline")
            .unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .expect("content-length");
            if buf.len() >= end + 4 + length {
                return text;
            }
        }
    }
}

async fn rested_at_least(n: u64) {
    eventually(&format!("{n} rests"), Duration::from_secs(10), || async {
        (rested_connections() >= n).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rested_connection_serves_its_next_request_and_keeps_a_head_cut_short() {
    let up = upstreams::http("app").await;
    let proxy = TestProxy::start(&config(VHOSTS, &cluster("app", "http1", &[up.addr]))).await;
    let mut conn = TcpStream::connect(proxy.addr("outbound")).await.unwrap();
    conn.write_all(b"GET /one HTTP/1.1\r\nhost: app\r\n\r\n")
        .await
        .unwrap();
    let first = response(&mut conn).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let before = rested_connections();

    // The next request starts before the connection rests and stops half way: the rest
    // finds its first part read and not yet parsed.
    conn.write_all(b"GET /two HTTP/1.1\r\nho").await.unwrap();
    rested_at_least(before + 1).await;
    conn.write_all(b"st: app\r\n\r\n").await.unwrap();
    let second = response(&mut conn).await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert!(second.contains("x-path: /two"), "{second}");

    // Then a whole rest, with nothing read: the next request wakes the connection.
    rested_at_least(before + 2).await;
    // As many clients send it: `Connection: keep-alive` does not keep a connection from resting.
    conn.write_all(b"GET /three HTTP/1.1\r\nhost: app\r\nconnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let third = response(&mut conn).await;
    assert!(third.starts_with("HTTP/1.1 200"), "{third}");
    assert!(third.contains("x-path: /three"), "{third}");
    let page = get(proxy.admin(), "/metrics").await.body;
    let rests = metric(
        &page,
        r#"outrigger_connection_rests_total{listener="outbound"}"#,
    );
    assert!(rests >= 2, "{page}");
    rested_at_least(before + 3).await;
}

/// The upstream answers a chunked upload at once, before its body is sent. The connection
/// is then quiet with the request body unfinished: if it rested, the bytes that follow would
/// be parsed as a new request head, and a request hidden in a body would reach the upstream.
/// The header timeout (30 s) holds on a keep-alive connection whose next head trickles in a
/// line every two seconds: the connection rests part way, and is cut off about 30 s after
/// the head began, not kept open for as long as the client keeps sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_trickled_past_the_header_timeout_is_cut_off() {
    let up = upstreams::http("app").await;
    let proxy = TestProxy::start(&config(VHOSTS, &cluster("app", "http1", &[up.addr]))).await;
    let mut conn = TcpStream::connect(proxy.addr("outbound")).await.unwrap();
    send(&mut conn, "/first").await;
    let first = response(&mut conn).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");

    let started = tokio::time::Instant::now();
    conn.write_all(b"GET /slow HTTP/1.1\r\nhost: app\r\n")
        .await
        .unwrap();
    let (mut reader, mut writer) = conn.into_split();
    let trickle = tokio::spawn(async move {
        for i in 0.. {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let line = format!("x-line-{i}: {i}\r\n");
            if writer.write_all(line.as_bytes()).await.is_err() {
                return;
            }
        }
    });
    // Whatever the proxy says (a 408 or nothing), the connection ends.
    let mut sink = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(45), reader.read_to_end(&mut sink)).await;
    trickle.abort();
    let took = started.elapsed();
    assert!(ended.is_ok(), "still open after {took:?}");
    assert!(
        took >= Duration::from_secs(29) && took < Duration::from_secs(40),
        "cut off after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_still_on_its_way_is_never_read_as_a_new_request() {
    let (up, heads) = upstreams::canned("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let proxy = TestProxy::start(&config(VHOSTS, &cluster("app", "http1", &[up.addr]))).await;

    let mut upload = TcpStream::connect(proxy.addr("outbound")).await.unwrap();
    upload
        .write_all(
            b"POST /upload HTTP/1.1\r\nhost: app\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await
        .unwrap();
    let answered = response(&mut upload).await;
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");

    // A second connection, quiet from later on, shows when the upload's connection has been
    // quiet long enough to rest; then give it time for its own check.
    let mut quiet = TcpStream::connect(proxy.addr("outbound")).await.unwrap();
    quiet
        .write_all(b"GET /quiet HTTP/1.1\r\nhost: app\r\n\r\n")
        .await
        .unwrap();
    let _ = response(&mut quiet).await;
    let before = rested_connections();
    rested_at_least(before + 1).await;
    let rested_twice = tokio::time::timeout(Duration::from_secs(3), rested_at_least(before + 2))
        .await
        .is_ok();

    upload
        .write_all(b"GET /smuggled HTTP/1.1\r\nhost: app\r\n\r\n")
        .await
        .unwrap();
    // Not a chunk size: the connection is closed, and nothing more is answered.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), upload.read_to_end(&mut rest)).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(!rest.contains("200 OK"), "answered again: {rest}");
    let heads = heads.lock().unwrap().join("");
    assert!(
        !heads.contains("/smuggled"),
        "reached the upstream: {heads}"
    );
    assert!(!rested_twice, "the upload's connection rested mid-body");
}

/// The same over mTLS, HTTP/1.1 by ALPN: the TLS session stays with the connection while it
/// rests, and carries the caller's identity into its next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mtls_connection_rests_and_its_next_request_keeps_its_identity() {
    const WEB: &str = "spiffe://mesh.test/ns/shop/sa/web";
    const API: &str = "spiffe://mesh.test/ns/shop/sa/api";
    let ca = Ca::generate("mesh.test").unwrap();
    let issue = |id: &str| {
        ca.issue(&SpiffeId::parse(id).unwrap(), DEFAULT_LIFETIME)
            .unwrap()
    };
    let (chain, key) = issue(API);
    let identity = identity_yaml(&write_identity(&chain, &key, ca.bundle_pem()));
    let app = upstreams::http("app").await;
    let proxy = strict_inbound(&identity, app.addr).await;

    let store = Arc::new(IdentityStore::default());
    store.set_bundle(ca.bundle_pem().as_bytes()).unwrap();
    let (chain, key) = issue(WEB);
    store
        .set_certificate(chain.as_bytes(), key.as_bytes())
        .unwrap();
    let expected = SpiffeId::parse(API).unwrap();
    let config = mtls::client_config(store, vec![expected], mtls::ALPN_HTTP1);
    let addr = proxy.addr("inbound");
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::IpAddress(addr.ip().into());
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(mtls::ALPN_HTTP1));

    let before = rested_connections();
    for (rests, path) in (1..).zip(["/one", "/two"]) {
        send(&mut tls, path).await;
        let answer = response(&mut tls).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains(&format!("x-path: {path}")), "{answer}");
        assert!(
            answer.contains(&format!("x-echo-x-outrigger-client-id: {WEB}")),
            "{answer}"
        );
        rested_at_least(before + rests).await;
    }
}

async fn send(conn: &mut (impl AsyncWrite + Unpin), path: &str) {
    let head = format!("GET {path} HTTP/1.1\r\nhost: app\r\n\r\n");
    conn.write_all(head.as_bytes()).await.unwrap();
}
