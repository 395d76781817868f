//! Timeouts over real sockets: a gRPC client's deadline, and idle downstream connections.

use std::time::{Duration, Instant};

use http::Method;
use outrigger_tests::clients::TestClient;
use outrigger_tests::{TestProxy, cluster, config, faults, upstreams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_deadline_shortens_the_route_timeout() {
    let (up, _) = faults::faulty("app").await;
    let vhosts = r#"- name: app
  domains: [app.test]
  routes:
    - backends: [{cluster: app}]
"#;
    let proxy = TestProxy::start(&config(vhosts, &cluster("app", "http1", &[up.addr]))).await;
    let client = TestClient::http2(proxy.addr("outbound")).await;
    let started = Instant::now();
    let r = client
        .send(
            Method::GET,
            "app.test",
            "/delay/5000",
            &[("grpc-timeout", "300m")],
            "",
        )
        .await
        .unwrap();
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(r.header("x-outrigger-error"), Some("timeout"));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_but_a_slow_request_is_not_idle() {
    let up = upstreams::http("app").await;
    let text = format!(
        r#"listeners:
  - name: inbound
    address: 127.0.0.1:0
    direction: inbound
    idle_timeout: 300ms
    virtual_hosts:
      - name: app
        domains: ['*']
        routes:
          - backends: [{{cluster: app}}]
clusters:
{}"#,
        outrigger_tests::indent(&cluster("app", "http1", &[up.addr]), 2)
    );
    let proxy = TestProxy::start(&text).await;
    let mut conn = tokio::net::TcpStream::connect(proxy.addr("inbound"))
        .await
        .unwrap();
    // A request that takes twice the idle timeout: in flight, so never idle.
    conn.write_all(b"GET /slow/600 HTTP/1.1\r\nhost: app\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = conn.read(&mut buf).await.unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    // Then nothing: the proxy closes the connection about 300 ms later.
    let quiet = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("closed within the deadline")
        .unwrap();
    assert_eq!(n, 0, "closed, not answered");
    let after = quiet.elapsed();
    assert!(
        after >= Duration::from_millis(250) && after < Duration::from_secs(2),
        "{after:?}"
    );
}
